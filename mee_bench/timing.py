"""Paired timing: speedups that survive a busy machine.

The baseline (`full`) and the candidate decode the same blocks of work in the same process,
alternating which goes first, or in lockstep (step generators advanced in turn, one generated
token each), so the machine's drift lands on both alike. The speedup is the ratio of time per
unit of work with a timing-noise interval from blocks timed more than once, re-timed until it
is as narrow as asked or the allowance is spent. docs/TIMING.md explains the method once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Generator, Generic, Sequence, TypeVar

import numpy as np

from mee_bench.engine.steps import Truncate

BUSY_MARGIN_CORES = 0.25  # others may use this much of our share before a trial counts as busy
Work = TypeVar("Work")
Result = TypeVar("Result")


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
        raise ValueError(f"paired timings need as many baseline as candidate blocks ({len(baseline_s)} vs {len(candidate_s)})")
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
    variance = np.sum((share_base**2 * var_base + share_cand**2 * var_cand - 2 * share_base * share_cand * covariance) / counts)
    spread = float(stats.t.ppf(1 - (1 - confidence) / 2, freedom)) * math.sqrt(max(float(variance), 0.0))
    return Speedup(ratio, ratio * math.exp(-spread), ratio * math.exp(spread), len(base), confidence, target_half_width, across)


def _across_work(
    base_mean: np.ndarray, cand_mean: np.ndarray, base_units: np.ndarray, cand_units: np.ndarray,
    confidence: float, resamples: int, seed: int,
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


def in_turn(
    runs: Sequence[Generator],
    order: Sequence[int] | None = None,
    sync: Callable[[], None] = lambda: None,
    followers: Collection[int] = (),
) -> list[tuple[float, object]]:
    """Advance the step generators `runs` one step each, in `order` (default: as given) every round,
    until all are done; per run, the total time of its own steps and its return value. `sync` is
    called before each clock read, as in `PairedTimer`. A follower (index in `followers`) still
    running once every other run has finished is stopped as soon as it has taken as many steps
    as the longest of them (`Truncate` thrown in, timed as its step), so it is timed on no more
    steps than they were."""
    order = range(len(runs)) if order is None else order
    leaders = [side for side in range(len(runs)) if side not in followers]
    seconds, results, running, steps = [0.0] * len(runs), [None] * len(runs), [True] * len(runs), [0] * len(runs)
    while any(running):
        for side in order:
            if not running[side]:
                continue
            stop_here = (side in followers and leaders and not any(running[i] for i in leaders)
                         and steps[side] >= max(steps[i] for i in leaders))
            sync()
            started = time.perf_counter()
            try:
                runs[side].throw(Truncate()) if stop_here else next(runs[side])
            except StopIteration as stop:
                running[side], results[side] = False, stop.value
            else:
                if stop_here:
                    raise RuntimeError(f"run {side} went on after Truncate: a follower must return when it is thrown in")
            sync()
            seconds[side] += time.perf_counter() - started
            steps[side] += 1
    return list(zip(seconds, results))


@dataclass
class PairedTimer:
    """Times baseline and candidate on the same blocks, alternating which goes first.

    `sync` is called before each clock read (e.g. `torch.cuda.synchronize`), so that
    asynchronous devices are timed to completion. With `lockstep`, the runs return step
    generators (their result is the generator's return value), advanced in turn one step each.
    With `truncate_baseline` as well, a baseline still running when the candidate has finished
    stops after as many steps (`in_turn`'s followers): for one decode per block, `full` is then
    timed over the positions the candidate generated, every step paired, instead of running on
    alone (unpaired, so noisy) through output the candidate never wrote.
    """

    sync: Callable[[], None] = lambda: None
    units: Callable[[object], float] | None = None  # what a block's result produced (e.g. tokens), per side
    lockstep: bool = False
    truncate_baseline: bool = False
    baseline_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # which piece of work each block timed
    baseline_units: list[float] = field(default_factory=list)
    candidate_units: list[float] = field(default_factory=list)

    def _timed(self, run: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        started = time.perf_counter()
        result = run()
        self.sync()
        return time.perf_counter() - started, result

    def block(
        self, run_baseline: Callable[[], object], run_candidate: Callable[[], object], group: int | None = None
    ) -> tuple[object, object]:
        """Time one block of each (`group`: which piece of work, default a new one); returns
        (baseline result, candidate result)."""
        baseline_first = len(self.baseline_s) % 2 == 0
        if self.lockstep:
            order = (0, 1) if baseline_first else (1, 0)
            (base_s, base), (cand_s, cand) = in_turn(
                (run_baseline(), run_candidate()), order, self.sync, followers=(0,) if self.truncate_baseline else ()
            )
        elif baseline_first:
            base_s, base = self._timed(run_baseline)
            cand_s, cand = self._timed(run_candidate)
        else:
            cand_s, cand = self._timed(run_candidate)
            base_s, base = self._timed(run_baseline)
        self.baseline_s.append(base_s)
        self.candidate_s.append(cand_s)
        self.groups.append(len(self.groups) if group is None else group)
        if self.units is not None:
            self.baseline_units.append(self.units(base))
            self.candidate_units.append(self.units(cand))
        return base, cand

    def speedup(self, target_half_width: float | None = None, confidence: float = 0.95) -> Speedup:
        units = (self.baseline_units, self.candidate_units) if self.units is not None else None
        return speedup_interval(self.baseline_s, self.candidate_s, self.groups, confidence, target_half_width, units)

    def samples(self) -> dict:
        """The raw paired timings (and units), for records that let anyone recompute the figure."""
        samples = {"baseline_s": self.baseline_s, "candidate_s": self.candidate_s, "groups": self.groups,
                   "interleaved": "per step" if self.lockstep else "per block",
                   "baseline_truncated": self.lockstep and self.truncate_baseline}
        if self.units is not None:
            samples.update(baseline_units=self.baseline_units, candidate_units=self.candidate_units)
        return samples


class PairedBlocks(Generic[Work, Result]):
    """The candidate's real work, each block paired with a timed baseline run of the same work.

    `run(work)` times one block of each (alternating order) and returns the candidate's
    result, so quality comes from that one decode (`units(result)`, if given, says how much a
    block produced: the speedup is then of time per unit); `speedup()` then re-times the same blocks
    in a seeded shuffled order (so the noise estimate samples short and long work alike,
    whatever order the work came in), cycling, until the interval's relative half-width is at most
    `target_half_width` or `allowance_s` of re-timing is spent. At least `min_repeats`
    blocks are re-timed even past the allowance: the noise estimate needs them (and is only
    as good as their number), so a slow trial still reports an interval, only a wide one.
    With `lockstep`, `baseline(work)` and `candidate(work)` return step generators, timed token
    by token in turn, and with `truncate_baseline` the baseline stops where the candidate did
    (`PairedTimer`).
    """

    def __init__(
        self,
        baseline: Callable[[Work], object],
        candidate: Callable[[Work], Result],
        target_half_width: float = 0.05,
        allowance_s: float = 60.0,
        min_repeats: int = 10,
        sync: Callable[[], None] = lambda: None,
        units: Callable[[object], float] | None = None,
        lockstep: bool = False,
        truncate_baseline: bool = False,
    ) -> None:
        self.baseline, self.candidate = baseline, candidate
        self.target_half_width, self.allowance_s, self.min_repeats = target_half_width, allowance_s, min_repeats
        self.timer = PairedTimer(sync=sync, units=units, lockstep=lockstep, truncate_baseline=truncate_baseline)
        self.work: list[Work] = []

    def run(self, work: Work) -> Result:
        self.work.append(work)
        return self.timer.block(lambda: self.baseline(work), lambda: self.candidate(work), len(self.work) - 1)[1]

    def speedup(self) -> Speedup:
        if not self.work:
            raise ValueError("no timed blocks: run at least one block of work first")
        order = np.random.default_rng(0).permutation(len(self.work)).tolist()
        started, index = time.perf_counter(), 0
        while True:
            if len(self.timer.baseline_s) - len(self.work) >= self.min_repeats:
                current = self.timer.speedup(self.target_half_width)
                if current.precise or time.perf_counter() - started >= self.allowance_s:
                    return current
            piece = order[index % len(order)]
            work = self.work[piece]
            self.timer.block(lambda: self.baseline(work), lambda: self.candidate(work), piece)
            index += 1


def time_paired(
    blocks: Sequence[tuple[Callable[[], object], Callable[[], object]]],
    target_half_width: float = 0.05,
    allowance_s: float = 60.0,
    min_repeats: int = 10,
    sync: Callable[[], None] = lambda: None,
) -> Speedup:
    """Time every (baseline, candidate) pair of callables once, then more rounds as `PairedBlocks` does."""
    if not blocks:
        raise ValueError("no blocks to time")
    paired = PairedBlocks(lambda pair: pair[0](), lambda pair: pair[1](), target_half_width, allowance_s, min_repeats, sync)
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
