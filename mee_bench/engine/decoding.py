"""Early-exit greedy decoding: the hot path.

One token per step, one decoder layer at a time. After each layer the policy's measure
may let rows exit; exited rows leave the active set, so they cost nothing in deeper
layers. Skipped layers get their self-attention K/V either copied from the exit state
(CALM) or computed later in one parallel catch-up call with the next token that goes
deep (FREE's synchronized parallel decoding, `deferred`). A `self_speculative` policy takes
the lossless draft-and-verify path of `speculative.py` instead.

`decode_steps` is the same decoding one step at a time (a generator), so that a timer can
interleave two decodes token by token (`mee_bench.timing`, lockstep pairing).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.policy import ExitPolicy, exit_decision
from mee_bench.engine.runner import HeadRows, LayerRunner, active_rows, build_runner
from mee_bench.engine.speculative import SpeculationCounts, self_speculative_generate
from mee_bench.engine.steps import ActiveClock, Steps, Truncate, run_steps

log = logging.getLogger(__name__)

FALLBACK_INPUT_LIMIT = 512  # T5's own limit, for tokenizers that state none


def input_limit(tokenizer, requested: int | None = None) -> int:
    """Prompt tokens allowed: `requested`, else the tokenizer's `model_max_length` when it states a
    real one (Hugging Face uses ~1e30 for "none"), else 512."""
    if requested:
        return requested
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else FALLBACK_INPUT_LIMIT


@dataclass
class GenerationStats:
    """Efficiency figures of one or more generate calls (they add up with `merge`)."""

    num_layers: int
    tokens: int = 0
    exit_histogram: Counter = field(default_factory=Counter)
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    measure_s: float = 0.0  # checks: the measure and the exit decision it feeds
    layer_positions: int = 0  # decoder layers run x positions (catch-up and verification included, prefill not)
    speculation: SpeculationCounts = field(default_factory=SpeculationCounts)

    @property
    def avg_exit_layer(self) -> float:
        return sum(layer * n for layer, n in self.exit_histogram.items()) / max(self.tokens, 1)

    @property
    def layers_per_token(self) -> float:
        """Decoder layers computed per generated token, whatever the policy (full: the depth; for a
        decoder-only model (N - 1) / N of it over N tokens, as the prefill computed the first)."""
        return self.layer_positions / max(self.tokens, 1)

    @property
    def acceptance_rate(self) -> float | None:
        """Self-speculation: the share of proposed draft tokens the full model accepted."""
        proposed = self.speculation.proposed
        return self.speculation.accepted / proposed if proposed else None

    @property
    def mean_accepted_draft(self) -> float | None:
        """Self-speculation: accepted draft tokens per row-round (each round also emits one token of its own)."""
        rounds = self.speculation.rounds
        return self.speculation.accepted / rounds if rounds else None

    def merge(self, other: "GenerationStats") -> "GenerationStats":
        return GenerationStats(
            num_layers=self.num_layers,
            tokens=self.tokens + other.tokens,
            exit_histogram=self.exit_histogram + other.exit_histogram,
            encoder_s=self.encoder_s + other.encoder_s,
            decoder_s=self.decoder_s + other.decoder_s,
            measure_s=self.measure_s + other.measure_s,
            layer_positions=self.layer_positions + other.layer_positions,
            speculation=SpeculationCounts(
                *(a + b for a, b in zip(astuple(self.speculation), astuple(other.speculation)))
            ),
        )

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "num_layers": self.num_layers,
            "avg_exit_layer": self.avg_exit_layer,
            "exit_histogram": {str(k): self.exit_histogram[k] for k in sorted(self.exit_histogram)},
            "encoder_ms": 1e3 * self.encoder_s,
            "decoder_ms": 1e3 * self.decoder_s,
            "measure_ms": 1e3 * self.measure_s,
            "decode_ms_per_token": 1e3 * self.decoder_s / max(self.tokens, 1),
            "layers_per_token": self.layers_per_token,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_draft": self.mean_accepted_draft,
        }


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, EOS included when produced
    exit_layers: list[list[int]]  # 1-based layer each token left the decoder at
    confidences: list[list[float]]  # the measure's value at the exit (or last check) layer; nan if never checked
    stats: GenerationStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CheckLogits:
    """The logits a measure reads for the current token at the current layer, memoised.

    With `top_k` (the policy's `vocab_top_k`), a token's first read is the whole vocabulary
    through the runner's rounded copy of the head (int8 rows on a CPU), and keeps each row's k
    best token ids; the later reads of that token compute those k rows of the head only (CALM's
    vocabulary-pruned softmax). The head is the largest matrix a check touches; the int8 copy
    moves a quarter of its bytes, and a pruned read k rows of it. The first check still sees the
    whole vocabulary's softmax: reading it through the k exact rows instead (the softmax of the k
    only) changes more exit decisions than the rounding does (`benchmarks/pruned_checks.py`).
    Only the exit decision is approximated: an exit's token is the argmax of the full-precision,
    full-vocabulary head at the exit layer.
    """

    def __init__(self, runner: LayerRunner, top_k: int) -> None:
        self.runner, self.top_k = runner, top_k
        self.rows: HeadRows | None = None  # the k head rows per running row, after the token's first read
        self.hidden: Tensor | None = None
        self.memo: Tensor | None = None

    def new_token(self) -> None:
        self.rows = None

    def at_layer(self, hidden: Tensor) -> None:
        self.hidden, self.memo = hidden, None

    def __call__(self) -> Tensor:
        if self.memo is None:
            if not self.top_k:
                self.memo = self.runner.logits(self.hidden)
            elif self.rows is None:
                self.memo = self.runner.approximate_logits(self.hidden).float()
                kept = self.memo[:, -1].topk(min(self.top_k, self.memo.shape[-1]), dim=-1).indices
                self.rows = self.runner.head_rows(kept)
            else:
                self.memo = self.runner.logits_for(self.hidden, self.rows)
        return self.memo

    def full_logits_read(self, leaving: slice | Tensor) -> Tensor | None:
        """The full-precision, full-vocabulary logits of the exiting rows `leaving` when this layer's
        check already read them; else None (the exit's token then needs a head read of its own)."""
        if self.memo is not None and not self.top_k:
            return self.memo[leaving]
        return None

    def select(self, keep: Tensor) -> None:
        if self.rows is not None:
            self.rows = self.rows.select(keep)


class EarlyExitGenerator:
    """Greedy early-exit generation over an unmodified Hugging Face model, through its layer runner.

    `heads_path` records where `heads` came from (reported with results); `heads_loader`, given
    instead of `heads`, reads them on first use, so a policy that needs none never opens the file.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        heads: ExitHeads | None = None,
        heads_path: Path | None = None,
        heads_loader: Callable[[], ExitHeads] | None = None,
    ) -> None:
        self.model = model
        self.runner = build_runner(model)
        self.tokenizer = tokenizer
        self._heads = heads.to(self.runner.device) if heads is not None else None
        self._heads_loader = heads_loader
        self.heads_path = heads_path

    @property
    def heads(self) -> ExitHeads | None:
        """The exit heads (read now if they were given as a loader), or None."""
        if self._heads is None and self._heads_loader is not None:
            self._heads = self._heads_loader().to(self.runner.device)
            self._heads_loader = None
        return self._heads

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    def tokenize(self, prompts: Sequence[str], max_input_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded input ids; prompts longer than the model allows are truncated with a warning."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("empty input: every prompt must be a non-empty string")
        limit = input_limit(self.tokenizer, max_input_length)
        lengths = [len(ids) for ids in self.tokenizer(list(prompts)).input_ids]
        too_long = sum(n > limit for n in lengths)
        if too_long:
            log.warning(
                "%d of %d prompts exceed %d tokens and are truncated (set max_input_length to change the limit)",
                too_long, len(prompts), limit,
            )
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=limit)
        return enc.input_ids.to(self.runner.device), enc.attention_mask.to(self.runner.device)

    def generate_text(
        self,
        prompts: Sequence[str],
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        max_input_length: int | None = None,
    ) -> tuple[list[str], GenerationOutput]:
        return run_steps(self.text_steps(prompts, policy, max_new_tokens, stop_strings, max_input_length))

    def text_steps(
        self,
        prompts: Sequence[str],
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        max_input_length: int | None = None,
    ) -> Steps[tuple[list[str], GenerationOutput]]:
        """`generate_text` a step at a time (see `decode_steps`)."""
        input_ids, attention_mask = self.tokenize(prompts, max_input_length)
        output = yield from self.decode_steps(input_ids, attention_mask, policy, max_new_tokens, stop_strings)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in output.tokens]
        return texts, output

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
    ) -> GenerationOutput:
        """Greedy early-exit generation of `input_ids` [B, S] under `policy`."""
        return run_steps(self.decode_steps(input_ids, attention_mask, policy, max_new_tokens, stop_strings))

    @torch.inference_mode()
    def decode_steps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        until_truncated: bool = False,
    ) -> Steps[GenerationOutput]:
        """`generate` as a generator: it yields after the prompt is taken in and after every
        generated step (a self-speculative round), and returns the `GenerationOutput`. Its timings
        count only the time spent inside it, however long it waits at a yield. `Truncate` thrown
        in at a step's yield (early-exit decoding) ends it there, with the tokens so far. With
        `until_truncated` (a timing baseline) a single row ends at no EOS or stop string: it decodes
        on until `Truncate` (or `max_new_tokens`), so it covers exactly the steps of the policy it is
        paired with. The rows of a larger batch still end at theirs: kept alive, they would make the
        baseline's steps wider than they are."""
        runner, num_layers = self.runner, self.runner.num_layers
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError("empty input: input_ids must be a non-empty [batch, length] tensor")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: build EarlyExitGenerator(model, tokenizer)")
        policy.check_model(num_layers)
        if until_truncated and policy.decoding != "early_exit":
            raise ValueError("until_truncated is for a timing baseline decoding early-exit style (e.g. `full`)")
        measure = policy.build_measure(self.heads if policy.needs_heads else None)
        measure.last_check_layer = num_layers - 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, device = input_ids.shape[0], runner.device
        stats = GenerationStats(num_layers=num_layers)
        clock = ActiveClock()

        started = clock.now()
        cache, last_tokens = runner.start(input_ids, attention_mask, max_new_tokens)
        _sync(device)
        stats.encoder_s = clock.now() - started
        yield from clock.pause()

        started = clock.now()
        if policy.decoding == "self_speculative":
            drafted = yield from clock.relay(self_speculative_generate(
                runner, cache, last_tokens, policy, measure, max_new_tokens, self._finished_check(stop_strings)
            ))
            _sync(device)
            stats.decoder_s = clock.now() - started
            stats.speculation, stats.layer_positions = drafted.counts, drafted.counts.layer_positions
            stats.tokens = sum(len(row) for row in drafted.tokens)
            exit_layers = [[num_layers] * len(row) for row in drafted.tokens]
            stats.exit_histogram.update({num_layers: stats.tokens})
            confidences = [[float("nan")] * len(row) for row in drafted.tokens]
            return GenerationOutput(drafted.tokens, exit_layers, confidences, stats)
        checks = CheckLogits(runner, policy.vocab_top_k)
        is_finished = (lambda row: False) if until_truncated and batch == 1 else self._finished_check(stop_strings)
        deferred = policy.kv_strategy == "deferred" and measure.can_exit
        done_layers = torch.full((batch, max_new_tokens), num_layers, dtype=torch.long, device=device)
        pending_states = (
            torch.zeros(batch, max_new_tokens, runner.hidden_size, dtype=runner.dtype, device=device) if deferred else None
        )
        tokens: list[list[int]] = [[] for _ in range(batch)]
        exit_layers: list[list[int]] = [[] for _ in range(batch)]
        confidences: list[list[float]] = [[] for _ in range(batch)]
        alive = torch.arange(batch, device=device)

        for step in range(max_new_tokens):
            threshold = policy.threshold_at(step, max_new_tokens)
            rows, slot = alive, torch.arange(alive.numel(), device=device)
            hidden = runner.embed(last_tokens[rows])[:, None]
            token = torch.zeros(rows.numel(), dtype=torch.long, device=device)
            exit_layer = torch.full_like(token, num_layers)
            confidence = torch.full(token.shape, float("nan"), device=device)
            measure.threshold = threshold
            measure.start(hidden, policy.min_exit_layer)
            checks.new_token()
            last_score = None  # the measure's latest values for the rows still running
            # (slots, states) whose token is still to be read: one head call for the whole step, not one
            # per exit layer (at batch > 1 the head, the largest matrix, is read once, not up to L times)
            unread: list[tuple[Tensor | slice, Tensor]] = []
            catching_up = deferred and step > 0 and bool((done_layers[rows, :step] < num_layers).any())
            # the prefill ran this step through every layer: its states are read back, its K/V are real
            prefilled = step == 0 and runner.prefills_first_step
            for index in range(num_layers):
                row_arg = active_rows(rows, batch)
                if catching_up:
                    hidden, caught_up = self._layer_with_catch_up(
                        index, hidden, cache, rows, row_arg, step, done_layers, pending_states
                    )
                    stats.layer_positions += caught_up
                else:
                    hidden = runner.layer(index, hidden, cache, row_arg, step, step)
                if not prefilled:
                    stats.layer_positions += rows.numel()
                layer = index + 1
                if layer == num_layers:
                    break
                checks.at_layer(hidden)
                measured = time.perf_counter()  # a check's cost: the measure and the decision it feeds
                score = measure.step(layer, hidden, checks)
                exits, exiting = (None, 0) if score is None else exit_decision(score, threshold)
                stats.measure_s += time.perf_counter() - measured
                if score is None:
                    continue
                last_score = score
                if exiting == 0:
                    continue
                everyone = exiting == rows.numel()  # always so at batch size 1: no indexing
                leaving = slice(None) if everyone else exits.nonzero().squeeze(1)
                exit_hidden = hidden if everyone else hidden[leaving]
                exit_logits = checks.full_logits_read(leaving)
                exit_slot = slot if everyone else slot[leaving]
                if exit_logits is not None:
                    token[exit_slot] = exit_logits[:, -1].argmax(-1)
                else:
                    unread.append((exit_slot, exit_hidden))
                exit_layer[exit_slot] = layer
                confidence[exit_slot] = (score if everyone else score[leaving]).float()
                if not prefilled:  # a prefilled step skipped no layer: nothing to copy or defer
                    leaving_rows = rows if everyone else rows[leaving]
                    if deferred:
                        done_layers[leaving_rows, step] = layer
                        pending_states[leaving_rows, step] = exit_hidden[:, 0]
                    else:
                        runner.copy_skipped_kv(layer, exit_hidden, cache, leaving_rows, step)
                if everyone:
                    rows = rows[:0]
                    break
                staying = ~exits
                rows, slot, hidden, last_score = rows[staying], slot[staying], hidden[staying], score[staying]
                measure.select(staying)
                checks.select(staying)
            if rows.numel():
                unread.append((slot, hidden))
                if last_score is not None:
                    confidence[slot] = last_score.float()
            if len(unread) == 1:
                token[unread[0][0]] = runner.logits(unread[0][1])[:, -1].argmax(-1)
            elif unread:
                slots, states = zip(*unread)
                token[torch.cat(slots)] = runner.logits(torch.cat(states))[:, -1].argmax(-1)
            exit_layer = measure.finish(token, exit_layer, num_layers)

            finished = self._record(alive, token, exit_layer, confidence, tokens, exit_layers, confidences, is_finished)
            last_tokens[alive] = token
            alive = alive[~finished]
            if alive.numel() == 0 or step + 1 == max_new_tokens:
                break
            try:
                yield from clock.pause()
            except Truncate:  # a timing baseline that has taken as many steps as its candidate
                break
        _sync(device)
        stats.decoder_s = clock.now() - started
        for row_layers in exit_layers:
            stats.exit_histogram.update(row_layers)
        stats.tokens = sum(len(row) for row in tokens)
        return GenerationOutput(tokens, exit_layers, confidences, stats)

    def _layer_with_catch_up(
        self,
        index: int,
        hidden: Tensor,
        cache: Any,
        rows: Tensor,
        row_arg: Tensor | None,
        step: int,
        done_layers: Tensor,
        pending_states: Tensor,
    ) -> tuple[Tensor, int]:
        """Run layer `index` for the current token together with every earlier token of the
        same row that exited before this layer, in one call with an explicit causal mask; the
        current token's output and how many earlier positions caught up."""
        pending = done_layers[rows, :step] == index
        counts = pending.sum(1)
        caught_up = int(counts.sum())
        if caught_up == 0:
            return self.runner.layer(index, hidden, cache, row_arg, step, step), 0
        width = int(counts.max()) + 1
        candidates = torch.arange(step, device=hidden.device).expand_as(pending)
        ordered = torch.where(pending, candidates, step).sort(dim=1).values[:, : width - 1]
        positions = torch.cat([ordered, ordered.new_full((rows.numel(), 1), step)], dim=1)
        is_pending = positions < step
        block_rows = rows[:, None].expand_as(positions)
        block = pending_states[block_rows, positions.clamp(max=step - 1)]
        block = torch.where(is_pending[..., None], block, hidden)
        block = self.runner.layer(index, block, cache, row_arg, positions, step)
        pending_states[block_rows[is_pending], positions[is_pending]] = block[is_pending]
        done_layers[block_rows[is_pending], positions[is_pending]] = index + 1
        return block[:, -1:], caught_up

    def _finished_check(self, stop_strings: Sequence[str]) -> Callable[[list[int]], bool]:
        """Whether a row's tokens so far end its generation: EOS last, or a stop string in its text."""

        def finished(tokens: list[int]) -> bool:
            if tokens[-1] == self.runner.eos_token_id:
                return True
            if not stop_strings:
                return False
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # once a step, whatever the stops
            return any(stop in text for stop in stop_strings)

        return finished

    def _record(
        self,
        alive: Tensor,
        token: Tensor,
        exit_layer: Tensor,
        confidence: Tensor,
        tokens: list[list[int]],
        exit_layers: list[list[int]],
        confidences: list[list[float]],
        is_finished: Callable[[list[int]], bool],
    ) -> Tensor:
        """Append this step's results per row; return which rows are now finished."""
        finished = []
        for row, tok, layer, conf in zip(alive.tolist(), token.tolist(), exit_layer.tolist(), confidence.tolist()):
            tokens[row].append(tok)
            exit_layers[row].append(layer)
            confidences[row].append(conf)
            finished.append(is_finished(tokens[row]))
        return torch.tensor(finished, dtype=torch.bool, device=alive.device)
