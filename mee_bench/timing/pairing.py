"""Interleaving: the baseline and the candidate decode the same work in the same process, in
alternating order or in lockstep (step generators advanced in turn), so that drift lands on both."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Generator, Generic, Sequence, TypeVar

import numpy as np

from mee_bench.engine.steps import Truncate
from mee_bench.timing.statistics import Speedup, speedup_interval

Work = TypeVar("Work")
Result = TypeVar("Result")


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
            stop_here = (
                side in followers
                and leaders
                and not any(running[i] for i in leaders)
                and steps[side] >= max(steps[i] for i in leaders)
            )
            sync()
            started = time.perf_counter()
            try:
                runs[side].throw(Truncate()) if stop_here else next(runs[side])
            except StopIteration as stop:
                running[side], results[side] = False, stop.value
            else:
                if stop_here:
                    raise RuntimeError(
                        f"run {side} went on after Truncate: a follower must return when it is thrown in"
                    )
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
        samples = {
            "baseline_s": self.baseline_s,
            "candidate_s": self.candidate_s,
            "groups": self.groups,
            "interleaved": "per step" if self.lockstep else "per block",
            "baseline_truncated": self.lockstep and self.truncate_baseline,
        }
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
    paired = PairedBlocks(
        lambda pair: pair[0](), lambda pair: pair[1](), target_half_width, allowance_s, min_repeats, sync
    )
    for pair in blocks:
        paired.run(pair)
    return paired.speedup()
