"""Paired timing: speedups that survive a busy machine.

A speedup read from two runs taken minutes apart carries whatever changed on the machine
in between. Here the baseline (`full`) and the candidate decode the same block of work
back to back, in alternating order, and each block gives one ratio; the speedup is the
median of the block ratios with a percentile bootstrap interval over blocks. Timing
stops as soon as the interval is as narrow as asked, or when the time allowance is
spent, in which case the result says it is imprecise instead of pretending.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

BUSY_MARGIN_CORES = 0.25  # others may use this much of our share before a trial counts as busy
Work = TypeVar("Work")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Speedup:
    """Baseline time / candidate time: above 1 the candidate is faster."""

    median: float
    low: float
    high: float
    blocks: int
    confidence: float = 0.95
    target_half_width: float | None = None  # relative; None = no precision was asked for

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval around the median."""
        return (self.high - self.low) / (2 * self.median) if self.median > 0 else math.inf

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
        return f"{self.median:.2f}x [{self.low:.2f}, {self.high:.2f}]"

    def as_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width, "precise": self.precise, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, figures: dict) -> "Speedup":
        """Back from `as_dict` (a record read from disk); the derived fields are recomputed."""
        return cls(**{name: figures[name] for name in cls.__dataclass_fields__ if name in figures})


def speedup_interval(
    baseline_s: Sequence[float],
    candidate_s: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    target_half_width: float | None = None,
) -> Speedup:
    """Median of the paired ratios baseline/candidate with a percentile bootstrap interval over blocks."""
    if len(baseline_s) != len(candidate_s):
        raise ValueError(f"paired timings need as many baseline as candidate blocks ({len(baseline_s)} vs {len(candidate_s)})")
    if len(baseline_s) == 0:
        raise ValueError("no timed blocks: time at least one block of the baseline and the candidate")
    ratios = np.asarray(baseline_s, dtype=float) / np.asarray(candidate_s, dtype=float)
    median = float(np.median(ratios))
    if len(ratios) < 2:
        return Speedup(median, 0.0, math.inf, 1, confidence, target_half_width)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, len(ratios)), replace=True), axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return Speedup(median, float(low), float(high), len(ratios), confidence, target_half_width)


@dataclass
class PairedTimer:
    """Times baseline and candidate on the same blocks, alternating which goes first.

    `sync` is called before each clock read (e.g. `torch.cuda.synchronize`), so that
    asynchronous devices are timed to completion.
    """

    sync: Callable[[], None] = lambda: None
    baseline_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)

    def _timed(self, run: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        started = time.perf_counter()
        result = run()
        self.sync()
        return time.perf_counter() - started, result

    def block(self, run_baseline: Callable[[], object], run_candidate: Callable[[], object]) -> tuple[object, object]:
        """Time one block of each; returns (baseline result, candidate result)."""
        if len(self.baseline_s) % 2 == 0:
            base_s, base = self._timed(run_baseline)
            cand_s, cand = self._timed(run_candidate)
        else:
            cand_s, cand = self._timed(run_candidate)
            base_s, base = self._timed(run_baseline)
        self.baseline_s.append(base_s)
        self.candidate_s.append(cand_s)
        return base, cand

    def speedup(self, target_half_width: float | None = None, confidence: float = 0.95) -> Speedup:
        return speedup_interval(self.baseline_s, self.candidate_s, confidence, target_half_width=target_half_width)


class PairedBlocks(Generic[Work, Result]):
    """The candidate's real work, each block paired with a timed baseline run of the same work.

    `run(work)` times one block of each (alternating order) and returns the candidate's
    result, so quality comes from that one decode; `speedup()` then adds timing-only
    rounds over the same blocks until the interval's relative half-width is at most
    `target_half_width` or `allowance_s` (counted from the first block) is spent. At least
    `min_blocks` blocks are timed even past the allowance, so that a slow trial still
    reports an interval, only a wide one.
    """

    def __init__(
        self,
        baseline: Callable[[Work], object],
        candidate: Callable[[Work], Result],
        target_half_width: float = 0.05,
        allowance_s: float = 60.0,
        min_blocks: int = 6,
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        self.baseline, self.candidate = baseline, candidate
        self.target_half_width, self.allowance_s, self.min_blocks = target_half_width, allowance_s, min_blocks
        self.timer = PairedTimer(sync=sync)
        self.work: list[Work] = []
        self.started: float | None = None

    def run(self, work: Work) -> Result:
        if self.started is None:
            self.started = time.perf_counter()
        self.work.append(work)
        return self.timer.block(lambda: self.baseline(work), lambda: self.candidate(work))[1]

    def speedup(self) -> Speedup:
        if not self.work:
            raise ValueError("no timed blocks: run at least one block of work first")
        index = 0
        while True:
            timed = len(self.timer.baseline_s)
            if timed >= self.min_blocks:
                current = self.timer.speedup(self.target_half_width)
                if current.precise or time.perf_counter() - self.started >= self.allowance_s:
                    return current
            work = self.work[index % len(self.work)]
            self.timer.block(lambda: self.baseline(work), lambda: self.candidate(work))
            index += 1


def time_paired(
    blocks: Sequence[tuple[Callable[[], object], Callable[[], object]]],
    target_half_width: float = 0.05,
    allowance_s: float = 60.0,
    min_blocks: int = 6,
    sync: Callable[[], None] = lambda: None,
) -> Speedup:
    """Time every (baseline, candidate) pair of callables once, then more rounds as `PairedBlocks` does."""
    if not blocks:
        raise ValueError("no blocks to time")
    paired = PairedBlocks(lambda pair: pair[0](), lambda pair: pair[1](), target_half_width, allowance_s, min_blocks, sync)
    for pair in blocks:
        paired.run(pair)
    return paired.speedup()


@dataclass
class LoadMonitor:
    """The machine's load while something ran: load average, CPU frequency, and how much CPU
    other processes took (system busy time minus this process's and its children's)."""

    threads: int = 1  # CPUs this process is meant to use (its torch threads)
    started: float = 0.0
    elapsed: float = 0.0
    other_cores: float = 0.0
    _system_busy: float = 0.0
    _own: float = 0.0

    def start(self) -> "LoadMonitor":
        self.started = time.perf_counter()
        self._system_busy, self._own = _system_busy_s(), _own_cpu_s()
        return self

    def stop(self) -> dict:
        """End the watch; returns `report()`."""
        self.elapsed = time.perf_counter() - self.started
        self.other_cores = max(0.0, (_system_busy_s() - self._system_busy) - (_own_cpu_s() - self._own)) / max(
            self.elapsed, 1e-9
        )
        return self.report()

    def __enter__(self) -> "LoadMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def report(self) -> dict:
        cpus = os.cpu_count() or 1
        spare = max(cpus - self.threads, 0)
        return {
            "load_avg_1m": os.getloadavg()[0],
            "cpus": cpus,
            "cpu_mhz": _cpu_mhz(),
            "other_processes_cpu_cores": round(self.other_cores, 3),
            "busy": self.other_cores > spare + BUSY_MARGIN_CORES,
        }


def _system_busy_s() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu_s() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _cpu_mhz() -> float | None:
    """Current mean CPU frequency where the OS exposes it, else None."""
    import psutil

    try:
        frequency = psutil.cpu_freq()
    except (NotImplementedError, FileNotFoundError, OSError):
        return None
    return round(frequency.current, 1) if frequency and frequency.current else None
