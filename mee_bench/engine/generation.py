"""What one generate call works on and what it produces, shared by every decoding strategy.

`Decode` is a strategy's input (the model's runner and cache after the prompt, the policy and
its measure, the settings of the call); a strategy is a step generator over it that returns a
`GenerationOutput` and fills the call's `GenerationStats`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import astuple, dataclass, field
from typing import Any, Callable

from torch import Tensor

from mee_bench.engine.measures import ExitMeasure
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import LayerRunner
from mee_bench.engine.steps import ActiveClock


@dataclass
class SpeculationCounts:
    """What drafting and verification did, summed over rows and rounds."""

    rounds: int = 0  # row-rounds: one draft-then-verify of one row
    proposed: int = 0  # draft tokens offered to verification
    accepted: int = 0  # proposals the full model agreed with (and that were emitted)
    layer_positions: int = 0  # decoder layers run x positions, padding excluded


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


@dataclass
class Decode:
    """One generate call, after its prompt was taken in: what a decoding strategy needs."""

    runner: LayerRunner
    cache: Any
    last_tokens: Tensor  # [B] each row's next decoder input
    policy: ExitPolicy
    measure: ExitMeasure
    max_new_tokens: int
    is_finished: Callable[[list[int]], bool]  # whether a row's tokens so far end it (EOS, stop strings)
    stats: GenerationStats
    clock: ActiveClock
