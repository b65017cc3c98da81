"""The speedup of a paired measurement and its interval: the ratio of time per unit of work, with a
bootstrap interval over blocks timed more than once (docs/TIMING.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Speedup:
    """Baseline time / candidate time: above 1 the candidate is faster."""

    ratio: float
    low: float
    high: float
    blocks: int
    confidence: float = 0.95
    target_half_width: float | None = None  # relative; None = no precision was asked for
    across_work: tuple[float, float] | None = None  # interval over which examples were drawn, not timing noise

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval around the ratio."""
        return (self.high - self.low) / (2 * self.ratio) if self.ratio > 0 else math.inf

    @property
    def precise(self) -> bool:
        """Whether the interval reached the asked precision (always true when none was asked)."""
        return self.target_half_width is None or self.half_width <= self.target_half_width

    @property
    def verdict(self) -> str:
        """'faster' / 'slower' only when the whole interval lies on one side of 1."""
        if self.low > 1:
            return "faster"
        if self.high < 1:
            return "slower"
        return "no measurable difference"

    def format(self) -> str:
        return f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}]"

    def as_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width, "precise": self.precise, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, figures: dict) -> "Speedup":
        """Back from `as_dict` (a record read from disk); the derived fields are recomputed. Records
        written before the ratio of totals call their point estimate `median`."""
        figures = {"ratio": figures.get("median"), **{k: v for k, v in figures.items() if k != "median"}}
        if figures.get("across_work") is not None:
            figures["across_work"] = tuple(figures["across_work"])
        return cls(**{name: figures[name] for name in cls.__dataclass_fields__ if name in figures})


def speedup_interval(
    baseline_s: Sequence[float],
    candidate_s: Sequence[float],
    groups: Sequence[int] | None = None,
    confidence: float = 0.95,
    target_half_width: float | None = None,
    units: tuple[Sequence[float], Sequence[float]] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> Speedup:
    """Total baseline time / total candidate time over paired blocks, with its timing-noise interval.

    `groups[i]` names the piece of work block i timed (None: every block timed the same work,
    as a benchmark's rounds do). Each piece's times are averaged, so every piece counts once,
    however often it was re-timed; a long example saves more time than a short one and counts
    for more. The interval is how far timing noise alone could move the ratio on this same work:
    the spread of re-timed pieces around their own means (log times, baseline and candidate
    jointly, so the pairing's shared noise cancels), propagated to the totals by the delta
    method, with Student's t for the few degrees of freedom. With no piece timed twice there is
    no noise estimate and the interval is unbounded. How the gain varies *between* pieces is
    another question, answered by `Speedup.across_work` (a bootstrap over pieces).

    With `units` (what each block of the baseline and of the candidate produced, e.g. generated
    tokens) the ratio is of time per unit over all the work: a policy that changes how much it
    generates is not credited or blamed for that in its speed.
    """
    from scipy import stats

    if len(baseline_s) != len(candidate_s):
        raise ValueError(
            f"paired timings need as many baseline as candidate blocks ({len(baseline_s)} vs {len(candidate_s)})"
        )
    if len(baseline_s) == 0:
        raise ValueError("no timed blocks: time at least one block of the baseline and the candidate")
    if groups is not None and len(groups) != len(baseline_s):
        raise ValueError(f"one group per timed block is needed ({len(groups)} groups for {len(baseline_s)} blocks)")
    base, cand = np.asarray(baseline_s, dtype=float), np.asarray(candidate_s, dtype=float)
    _, inverse = np.unique(np.zeros(len(base)) if groups is None else np.asarray(groups), return_inverse=True)
    counts = np.bincount(inverse)
    base_mean, cand_mean = (np.bincount(inverse, weights=times) / counts for times in (base, cand))
    if units is None:
        base_units = cand_units = np.ones(len(counts))
    else:
        if not len(units[0]) == len(units[1]) == len(base):
            raise ValueError(f"one count of units per timed block and side is needed ({len(base)} blocks)")
        base_units, cand_units = (np.bincount(inverse, weights=np.asarray(u, dtype=float)) / counts for u in units)
    scale = cand_units.sum() / base_units.sum()  # exact counts: they rescale the ratio, not its noise
    ratio = float(base_mean.sum() / cand_mean.sum() * scale)
    across = _across_work(base_mean, cand_mean, base_units, cand_units, confidence, resamples, seed)
    freedom = len(base) - len(counts)
    if freedom < 1:
        return Speedup(ratio, 0.0, math.inf, len(base), confidence, target_half_width, across)
    log_base, log_cand = np.log(base), np.log(cand)
    residual_base = log_base - (np.bincount(inverse, weights=log_base) / counts)[inverse]
    residual_cand = log_cand - (np.bincount(inverse, weights=log_cand) / counts)[inverse]
    var_base, var_cand = residual_base @ residual_base / freedom, residual_cand @ residual_cand / freedom
    covariance = residual_base @ residual_cand / freedom
    share_base, share_cand = base_mean / base_mean.sum(), cand_mean / cand_mean.sum()
    variance = np.sum(
        (share_base**2 * var_base + share_cand**2 * var_cand - 2 * share_base * share_cand * covariance) / counts
    )
    spread = float(stats.t.ppf(1 - (1 - confidence) / 2, freedom)) * math.sqrt(max(float(variance), 0.0))
    return Speedup(
        ratio, ratio * math.exp(-spread), ratio * math.exp(spread), len(base), confidence, target_half_width, across
    )


def _across_work(
    base_mean: np.ndarray,
    cand_mean: np.ndarray,
    base_units: np.ndarray,
    cand_units: np.ndarray,
    confidence: float,
    resamples: int,
    seed: int,
) -> tuple[float, float] | None:
    """Percentile bootstrap of the ratio (of time per unit) over the pieces of work: how much the
    gain depends on which examples were drawn. None with fewer than two pieces."""
    if len(base_mean) < 2:
        return None
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(base_mean), np.full(len(base_mean), 1 / len(base_mean)), size=resamples)
    tail = (1 - confidence) / 2
    per_unit = (weights @ base_mean) / (weights @ base_units), (weights @ cand_mean) / (weights @ cand_units)
    low, high = np.quantile(per_unit[0] / per_unit[1], [tail, 1 - tail])
    return float(low), float(high)
