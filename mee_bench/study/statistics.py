"""The monotonicity statistics of the paper's study: pure functions over per-layer logits.

Early exiting assumes a layer's top-1 prediction, once confident, stays. Per decoder
layer we count how often the top-1 never changes again, how much probability the
eventual prediction gets, how saturated the hidden states are and how often MEE's "last
three top-1 scores rise and reach 0.9" rule fires and is right. Everything here works on
[layers, tokens, vocab] logits so it can be checked by hand; `analysis.py` feeds it one
batch at a time and keeps only per-layer sums, never the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.oracle import top1_unchanged_after

TOP_K = 3


@dataclass
class TokenPredictions:
    """What the LM head says at every layer for N tokens, without the vocabulary dimension."""

    top_ids: Tensor  # [L, N, k] the k most likely tokens per layer, most likely first
    top_probs: Tensor  # [L, N, k] their probabilities
    final_prob: Tensor  # [L, N] probability of the final layer's top-1 at each layer

    @classmethod
    def from_layers(cls, per_layer: Sequence[tuple[Tensor, Tensor, Tensor]]) -> "TokenPredictions":
        """Stack `layer_predictions` results, layer 1 first."""
        return cls(*(torch.stack(parts) for parts in zip(*per_layer)))

    @property
    def top1(self) -> Tensor:
        return self.top_ids[..., 0]

    @property
    def top1_prob(self) -> Tensor:
        return self.top_probs[..., 0]


def layer_predictions(logits: Tensor, final_ids: Tensor, k: int = TOP_K) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's [N, V] logits -> (top-k ids, top-k probabilities, probability of `final_ids`)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    top = log_probs.topk(k, dim=-1)
    final_prob = log_probs.gather(-1, final_ids[:, None]).squeeze(-1).exp()
    return top.indices, top.values.exp(), final_prob


def predictions_from_logits(logits: Tensor, k: int = TOP_K) -> TokenPredictions:
    """[L, N, V] per-layer logits (layer 1 first, the final layer last) -> TokenPredictions."""
    final_ids = logits[-1].argmax(-1)
    return TokenPredictions.from_layers([layer_predictions(layer_logits, final_ids, k) for layer_logits in logits])


def top1_matches_final(top1: Tensor) -> Tensor:
    """[L, N] top-1 ids -> [L, N] bool: the top-1 at layer i is the final layer's top-1."""
    return top1 == top1[-1:]


def rising_last_three(top1_prob: Tensor, threshold: float | None = None) -> Tensor:
    """[L, N] top-1 probabilities -> [L, N] bool: at layer i (>= 3) the top-1 probabilities of
    layers i-2 < i-1 < i strictly rise (whatever the tokens), and with `threshold` all reach it.

    This is the `monotonic_heuristic` measure's exit rule evaluated at every layer.
    """
    rising = torch.zeros_like(top1_prob, dtype=torch.bool)
    first, second, third = top1_prob[:-2], top1_prob[1:-1], top1_prob[2:]
    fires = (first < second) & (second < third)
    if threshold is not None:
        fires &= first >= threshold
    rising[2:] = fires
    return rising


def hidden_state_saturation(states: Tensor) -> Tensor:
    """[L+1, N, d] raw states (decoder input embedding first) -> [L, N] cosine of h_i and h_(i-1),
    CALM's saturation signal."""
    states = states.float()
    return F.cosine_similarity(states[1:], states[:-1], dim=-1)


class LayerStatistics:
    """Per-layer sums over any number of token batches; memory does not grow with the data."""

    def __init__(self, num_layers: int, threshold: float = 0.9, min_exit_layer: int = 4) -> None:
        self.num_layers, self.threshold, self.min_exit_layer = num_layers, threshold, min_exit_layer
        self.tokens = 0
        self.final_correct = 0
        self.sums: dict[str, Tensor] = {}
        self.heuristic = {"fired": 0, "exit_equals_final": 0, "exit_layer_sum": 0}

    def _add(self, name: str, values: Tensor) -> None:
        total = values.double().sum(-1).cpu()
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def add(
        self, predictions: TokenPredictions, saturation: Tensor | None = None, targets: Tensor | None = None
    ) -> None:
        """Add N tokens: their per-layer predictions, optional [L, N] saturation and [N] target ids."""
        if predictions.top1.shape[0] != self.num_layers:
            raise ValueError(f"predictions have {predictions.top1.shape[0]} layers, expected {self.num_layers}")
        count = predictions.top1.shape[1]
        if count == 0:
            return
        self.tokens += count
        unchanged = top1_unchanged_after(predictions.top1)
        rising = rising_last_three(predictions.top1_prob)
        confident = rising_last_three(predictions.top1_prob, self.threshold)
        self._add("no_change", unchanged)
        self._add("matches_final", top1_matches_final(predictions.top1))
        self._add("confidence", predictions.final_prob)
        self._add("confidence_sq", predictions.final_prob.double() ** 2)
        self._add("top1_prob", predictions.top1_prob)
        self._add("rising", rising)
        self._add("rising_kept", rising & unchanged)
        self._add("rising_confident", confident)
        self._add("rising_confident_kept", confident & unchanged)
        if saturation is not None:
            self._add("saturation", saturation)
            self._add("saturation_sq", saturation.double() ** 2)
        if targets is not None:
            self.final_correct += int((predictions.top1[-1] == targets).sum())
        self._add_heuristic(predictions.top1, confident)

    def _add_heuristic(self, top1: Tensor, confident: Tensor) -> None:
        """MEE's heuristic as a decoder would run it: exit at the first layer in
        [min_exit_layer, L-1] where the rule fires; count exits and whether they are right."""
        window = confident[self.min_exit_layer - 1 : self.num_layers - 1]
        if window.numel() == 0:
            self.heuristic["exit_layer_sum"] += self.num_layers * top1.shape[1]
            return
        fired = window.any(0)
        first = window.int().argmax(0) + self.min_exit_layer  # 1-based layer of the first firing
        exit_layer = torch.where(fired, first, self.num_layers)
        exit_top1 = top1.gather(0, (exit_layer - 1)[None]).squeeze(0)
        self.heuristic["fired"] += int(fired.sum())
        self.heuristic["exit_equals_final"] += int((fired & (exit_top1 == top1[-1])).sum())
        self.heuristic["exit_layer_sum"] += int(exit_layer.sum())

    def rows(self) -> list[dict]:
        """One dict per layer (1-based): fractions, means and standard deviations (ddof 0)."""
        n = max(self.tokens, 1)
        mean = {name: (total / n).tolist() for name, total in self.sums.items()}

        def std(name: str) -> list[float]:
            return [math.sqrt(max(sq - m * m, 0.0)) for m, sq in zip(mean[name], mean[f"{name}_sq"])]

        def ratio(part: str, whole: str) -> list[float]:
            return [p / w if w else math.nan for p, w in zip(self.sums[part].tolist(), self.sums[whole].tolist())]

        columns = {
            "no_change": mean["no_change"],
            "matches_final": mean["matches_final"],
            "confidence_mean": mean["confidence"],
            "confidence_std": std("confidence"),
            "top1_prob_mean": mean["top1_prob"],
            "rising": mean["rising"],
            "rising_kept": ratio("rising_kept", "rising"),
            "rising_confident": mean["rising_confident"],
            "rising_confident_kept": ratio("rising_confident_kept", "rising_confident"),
        }
        if "saturation" in self.sums:
            columns["saturation_mean"] = mean["saturation"]
            columns["saturation_std"] = std("saturation")
        undefined = {"rising", "rising_kept", "rising_confident", "rising_confident_kept"}  # need three layers
        return [
            {
                "layer": i + 1,
                **{name: math.nan if i < 2 and name in undefined else values[i] for name, values in columns.items()},
            }
            for i in range(self.num_layers)
        ]

    def heuristic_summary(self) -> dict:
        fired, n = self.heuristic["fired"], max(self.tokens, 1)
        return {
            "min_exit_layer": self.min_exit_layer,
            "threshold": self.threshold,
            "fires": fired / n,
            "exit_equals_final": self.heuristic["exit_equals_final"] / fired if fired else math.nan,
            "mean_exit_layer": self.heuristic["exit_layer_sum"] / n,
        }


def layer_statistics(logits: Tensor, states: Tensor | None = None, threshold: float = 0.9) -> list[dict]:
    """Per-layer statistics of [L, N, V] logits (and [L+1, N, d] raw states, if given)."""
    stats = LayerStatistics(logits.shape[0], threshold)
    stats.add(predictions_from_logits(logits), None if states is None else hidden_state_saturation(states))
    return stats.rows()
