"""Confidence measures behind one interface and one registry.

A measure is asked once per decoder layer, for the rows still running; it returns a
confidence per row at the layers where an exit is allowed, or None. Per-token state
(the previous state, the LSTM carry, the last three states or scores) lives in the
measure and shrinks with the active rows. Adding a measure = one class + `@register`.

Each class also carries its facts (whether it takes a threshold, which exit head it reads,
whether it is for analysis only); the sweep, the policy and head training read them here.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.oracle import top1_unchanged_after

MEASURES: dict[str, type["ExitMeasure"]] = {}


def register(cls: type["ExitMeasure"]) -> type["ExitMeasure"]:
    MEASURES[cls.name] = cls
    return cls


def measure_class(name: str) -> type["ExitMeasure"]:
    """The registered measure called `name`, or the one "unknown measure" error."""
    if name not in MEASURES:
        raise ValueError(f"unknown measure {name!r}; valid measures: {', '.join(sorted(MEASURES))}")
    return MEASURES[name]


def head_names() -> list[str]:
    """The exit heads some registered measure reads: what head training must train."""
    return sorted({cls.head for cls in MEASURES.values() if cls.head is not None})


class ExitMeasure:
    """Base class: never exits. Subclasses override `score` (the confidence at a check layer) and, when
    they carry state across layers, `observe` (every layer) and `select`; the rule that no layer before
    the first check layer is scored lives in `step`, once."""

    name: ClassVar[str]
    can_exit: ClassVar[bool] = True
    takes_threshold: ClassVar[bool] = True  # False: the exit layer does not depend on the threshold
    analysis_only: ClassVar[bool] = False  # True: needs the final layer's answer, so it never speeds anything up
    head: ClassVar[str | None] = None  # the `ExitHeads` attribute it reads, if any
    needs_heads: ClassVar[bool] = False  # derived from `head`
    threshold_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    vocab_prunable: ClassVar[bool] = False  # True: its confidence reads the top of the softmax only, so
    # the policy's `vocab_top_k` may hand it logits of the token's k best first-check tokens

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.needs_heads = cls.head is not None

    def __init__(self, heads: ExitHeads | None = None) -> None:
        self.heads = heads
        self.first_check_layer = 1
        # Set by the decoding loop, so that a measure may skip work whose result cannot reach the
        # threshold: this token's threshold (-inf: unknown) and the deepest layer it can exit at.
        self.threshold = float("-inf")
        self.last_check_layer: int | None = None

    def start(self, embedding: Tensor, first_check_layer: int) -> None:
        """A new token: `embedding` [A, 1, d] is the decoder input, i.e. "layer 0"."""
        self.first_check_layer = first_check_layer

    def step(self, layer: int, hidden: Tensor, logits: Callable[[], Tensor]) -> Tensor | None:
        """`hidden` [A, 1, d] is the raw output of decoder `layer` (1-based); `logits()` its
        memoised LM-head logits (over a pruned vocabulary after the token's first read when the
        policy sets `vocab_top_k` and the measure is `vocab_prunable`). Every layer is observed;
        returns a confidence [A] at check layers, else None."""
        self.observe(layer, hidden, logits)
        if layer < self.first_check_layer:
            return None
        return self.score(layer, hidden, logits)

    def observe(self, layer: int, hidden: Tensor, logits: Callable[[], Tensor]) -> None:
        """Take in layer `layer`'s state, check layer or not (for measures that look back over layers)."""

    def score(self, layer: int, hidden: Tensor, logits: Callable[[], Tensor]) -> Tensor | None:
        """The confidence [A] at check layer `layer` (None: no opinion at this layer)."""
        return None

    def select(self, keep: Tensor) -> None:
        """Keep only the rows where `keep` is true (the others exited)."""

    def finish(self, tokens: Tensor, exit_layers: Tensor, num_layers: int) -> Tensor:
        """The exit layers [A] to record for this step's final `tokens` [A] (all rows of the step)."""
        return exit_layers


def top1_probability(logits: Tensor) -> Tensor:
    return logits.float().softmax(-1).max(-1).values


@register
class Full(ExitMeasure):
    """Never exits: the baseline every speedup is measured against."""

    name = "full"
    can_exit = False
    takes_threshold = False


@register
class Fixed(ExitMeasure):
    """Always confident: every token exits at the minimum exit layer (a fixed-depth baseline)."""

    name = "fixed"
    takes_threshold = False

    def score(self, layer, hidden, logits):
        return hidden.new_ones(hidden.shape[0], dtype=torch.float32)


@register
class Softmax(ExitMeasure):
    """CALM: top-1 minus top-2 softmax probability at the current layer."""

    name = "softmax"
    vocab_prunable = True

    def score(self, layer, hidden, logits):
        top2 = logits()[:, -1].float().softmax(-1).topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


@register
class Saturation(ExitMeasure):
    """CALM: cosine similarity of h_i and h_(i-1) (h_0 is the decoder input embedding)."""

    name = "saturation"
    threshold_range = (-1.0, 1.0)

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.previous = embedding

    def observe(self, layer, hidden, logits):
        self.before, self.previous = self.previous, hidden

    def score(self, layer, hidden, logits):
        return F.cosine_similarity(hidden.float(), self.before.float(), dim=-1)[:, -1]

    def select(self, keep):
        self.previous = self.previous[keep]


def exit_probability(head_logits: Tensor) -> Tensor:
    return head_logits.softmax(-1)[..., 1]


class LearnedMeasure(ExitMeasure):
    """A measure that reads one trained exit head (`head`)."""

    def __init__(self, heads: ExitHeads | None = None) -> None:
        if heads is None:
            raise ValueError(
                f"measure {self.name!r} needs trained exit heads and none were found; "
                "train them with `mee-bench train-heads MODEL` or pass heads=PATH"
            )
        super().__init__(heads)
        self.head_module = getattr(heads, self.head)
        self.head_dtype = next(heads.parameters()).dtype


@register
class Classifier(LearnedMeasure):
    """CALM: an MLP on the current state -> P(exit)."""

    name = "classifier"
    head = "classifier"

    def score(self, layer, hidden, logits):
        return exit_probability(self.head_module(hidden[:, -1].to(self.head_dtype)))


@register
class LSTMMeasure(LearnedMeasure):
    """MEE: a 2-layer LSTM over h_1..h_i; its carry moves one layer per step, never recomputed."""

    name = "lstm"
    head = "lstm"

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.carry = None

    def observe(self, layer, hidden, logits):
        self.out, self.carry = self.head_module.step(hidden[:, -1].to(self.head_dtype), self.carry)

    def score(self, layer, hidden, logits):
        return exit_probability(self.out)

    def select(self, keep):
        self.carry = [(state[keep], cell[keep]) for state, cell in self.carry]


@register
class LastThreeMLP(LearnedMeasure):
    """MEE: an MLP over [h_(i-2), h_(i-1), h_i]."""

    name = "last_three_mlp"
    head = "last_three_mlp"

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.history = [embedding[:, -1], embedding[:, -1]]

    def observe(self, layer, hidden, logits):
        self.history = [*self.history[-2:], hidden[:, -1]]

    def score(self, layer, hidden, logits):
        features = torch.cat(self.history, dim=-1).to(self.head_dtype)
        return exit_probability(self.head_module(features))

    def select(self, keep):
        self.history = [state[keep] for state in self.history]


@register
class MonotonicHeuristic(ExitMeasure):
    """MEE: exit iff the top-1 probabilities of the last three layers strictly increase
    and all reach the threshold. The confidence is the smallest of the three when they
    rise, else 0, so `confidence >= threshold` is exactly that rule.

    A layer's probability below the threshold rules out the exits at that layer and the two
    after it, so a layer's probability is computed only while some exit it takes part in is
    still possible: a token that is never confident reads the head at two layers, not at every
    one. The decisions are those of reading every layer; a skipped probability counts as 0."""

    name = "monotonic_heuristic"
    vocab_prunable = True

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.scores: list[Tensor] = []

    def observe(self, layer, hidden, logits):
        if layer < self.first_check_layer - 2:  # no exit this token can take reads this layer
            return
        if self._may_decide(layer):
            score = top1_probability(logits()[:, -1])
        else:
            score = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        self.scores = [*self.scores[-2:], score]

    def score(self, layer, hidden, logits):
        if len(self.scores) < 3:
            return None
        first, second, third = self.scores
        rising = (first < second) & (second < third)
        return torch.where(rising, first, torch.zeros_like(first))

    def _may_decide(self, layer: int) -> bool:
        """Whether some row may still exit at `layer`, `layer` + 1 or `layer` + 2 given the
        probabilities read so far (each exit needs its three to reach the threshold)."""
        last, first = self.last_check_layer, self.first_check_layer
        if last is None or first <= layer + 2 <= last:
            return True
        reached = [score >= self.threshold for score in self.scores[-2:]]
        possible = torch.zeros_like(reached[-1]) if reached else None
        if reached and first <= layer + 1 <= last:
            possible |= reached[-1]
        if len(reached) == 2 and first <= layer <= last:
            possible |= reached[-1] & reached[-2]
        return possible is not None and bool(possible.any())

    def select(self, keep):
        self.scores = [score[keep] for score in self.scores]


@register
class Oracle(ExitMeasure):
    """Runs every layer and records the first layer (>= the minimum) after which the top-1
    never changes. An upper bound for analysis; its tokens are the full model's."""

    name = "oracle"
    can_exit = False
    takes_threshold = False
    analysis_only = True

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.top1: list[Tensor] = []

    def score(self, layer, hidden, logits):
        self.top1.append(logits()[:, -1].argmax(-1))
        return None

    def finish(self, tokens: Tensor, exit_layers: Tensor, num_layers: int) -> Tensor:
        """Per row, the oracle exit layer given the final layer's tokens."""
        settled = top1_unchanged_after(torch.stack([*self.top1, tokens]))
        first = settled.int().argmax(0)  # the first layer from which the top-1 stays put
        return torch.where(first == len(self.top1), num_layers, self.first_check_layer + first)


def measure_facts(name: str) -> dict:
    """What tables need to know about a measure, written into each sweep record so that
    reading results needs no engine."""
    cls = measure_class(name)
    return {"analysis_only": cls.analysis_only, "takes_threshold": cls.takes_threshold}


def build_measure(name: str, heads: ExitHeads | None = None) -> ExitMeasure:
    cls = measure_class(name)
    return cls(heads) if cls.needs_heads else cls()
