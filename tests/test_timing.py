"""Paired timing: interval coverage, interleaving, the verdict rule, and the time allowance."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from mee_bench.engine.steps import Truncate
from mee_bench.timing.load import LoadMonitor
from mee_bench.timing.pairing import PairedBlocks, PairedTimer, in_turn, time_paired
from mee_bench.timing.statistics import Speedup, speedup_interval


class FakeClock:
    """A clock that only moves when a fake workload says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def run() -> float:
            self.now += seconds
            return seconds

        return run


def test_the_interval_covers_a_known_ratio_at_about_the_nominal_rate():
    """Rounds of the same work with log-normal noise: the interval holds the true ratio ~95% of the time."""
    rng = np.random.default_rng(0)
    true_ratio, draws, blocks = 1.3, 300, 15
    covered = 0
    for draw in range(draws):
        base = 0.1 * np.exp(rng.normal(0, 0.05, blocks))
        cand = 0.1 / true_ratio * np.exp(rng.normal(0, 0.05, blocks))
        speedup = speedup_interval(base, cand, seed=draw)
        covered += speedup.low <= true_ratio <= speedup.high
    assert 0.9 <= covered / draws <= 0.99


def fixed_set_timings(rng: np.random.Generator, repeats: int, noise: float = 0.05):
    """40 examples of different lengths and gains, every one timed once, the first `repeats` twice:
    the total-time ratio of the noiseless times is the truth the interval should hold."""
    base_true = rng.uniform(0.02, 0.4, 40)
    cand_true = base_true / rng.uniform(0.8, 2.0, 40)
    groups = [*range(40), *range(repeats)]
    base = base_true[groups] * np.exp(rng.normal(0, noise, len(groups)))
    cand = cand_true[groups] * np.exp(rng.normal(0, noise, len(groups)))
    return base, cand, groups, base_true.sum() / cand_true.sum()


def test_on_fixed_work_the_noise_interval_covers_the_ratio_of_totals():
    rng = np.random.default_rng(3)
    covered, draws = 0, 300
    for draw in range(draws):
        base, cand, groups, truth = fixed_set_timings(rng, repeats=12)
        speedup = speedup_interval(base, cand, groups, seed=draw)
        covered += speedup.low <= truth <= speedup.high
    assert 0.9 <= covered / draws <= 0.99


def test_examples_that_differ_widen_only_the_across_work_interval():
    """Gains from 0.8x to 2x between examples are not timing noise: the noise interval stays narrow,
    the interval over which examples were drawn is the wide one."""
    base, cand, groups, truth = fixed_set_timings(np.random.default_rng(4), repeats=12, noise=0.01)
    speedup = speedup_interval(base, cand, groups)
    low, high = speedup.across_work
    assert speedup.half_width < 0.02 < (high - low) / (2 * speedup.ratio)
    assert low < speedup.low <= truth <= speedup.high < high


def test_every_piece_of_work_counts_once_however_often_it_was_retimed():
    base = [1.0, 1.0, 1.0, 1.0, 0.1]
    cand = [0.5, 0.5, 0.5, 0.5, 0.1]
    assert speedup_interval(base, cand, [0, 0, 0, 0, 1]).ratio == pytest.approx(1.1 / 0.6)


def test_without_a_piece_timed_twice_there_is_no_noise_estimate():
    speedup = speedup_interval([1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [0, 1, 2])
    assert (
        speedup.ratio == pytest.approx(2.0)
        and math.isinf(speedup.high)
        and speedup.verdict == "no measurable difference"
    )


def test_blocks_alternate_which_side_runs_first():
    order: list[str] = []
    timer = PairedTimer()
    for _ in range(4):
        timer.block(lambda: order.append("base"), lambda: order.append("cand"))
    assert order == ["base", "cand", "cand", "base", "base", "cand", "cand", "base"]
    assert len(timer.baseline_s) == len(timer.candidate_s) == 4


def test_sync_runs_around_every_clock_read():
    calls: list[str] = []
    timer = PairedTimer(sync=lambda: calls.append("sync"))
    timer.block(lambda: calls.append("base"), lambda: calls.append("cand"))
    assert calls == ["sync", "base", "sync", "sync", "cand", "sync"]


def test_lockstep_takes_turns_a_step_at_a_time_and_times_each_side_by_its_own_steps(monkeypatch):
    """Two step generators of 4 and 2 steps: they alternate step by step (the first block's baseline
    first, the next block's candidate first), the longer one finishes alone, each side's time is the
    sum of its own steps, and the results are the generators' return values."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    order: list[str] = []

    def steps(name: str, count: int, seconds: float):
        for _ in range(count):
            order.append(name)
            clock.now += seconds
            yield
        return f"{name} done"

    timer = PairedTimer(lockstep=True)
    assert timer.block(lambda: steps("base", 4, 0.3), lambda: steps("cand", 2, 0.1)) == ("base done", "cand done")
    assert order == ["base", "cand", "base", "cand", "base", "base"]
    order.clear()
    timer.block(lambda: steps("base", 4, 0.3), lambda: steps("cand", 2, 0.1))
    assert order == ["cand", "base", "cand", "base", "base", "base"]
    assert timer.baseline_s == pytest.approx([1.2, 1.2]) and timer.candidate_s == pytest.approx([0.2, 0.2])
    assert timer.speedup().ratio == pytest.approx(6.0) and timer.samples()["interleaved"] == "per step"


def test_in_turn_runs_any_number_of_step_generators_in_the_given_order(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    order: list[int] = []

    def steps(index: int, count: int):
        for _ in range(count):
            order.append(index)
            clock.now += index + 1
            yield
        return index

    timed = in_turn([steps(0, 1), steps(1, 3), steps(2, 2)], order=[2, 0, 1])
    assert order == [2, 0, 1, 2, 1, 1]
    assert timed == [(1.0, 0), (6.0, 1), (6.0, 2)]


def test_a_truncated_baseline_stops_after_as_many_steps_as_the_candidate(monkeypatch):
    """Like a decode, each call does one step of work and the last one returns; a baseline of 5 steps
    against a candidate of 2 is stopped after its own 2nd step whichever side goes first, and is
    timed on those 2 steps only; a baseline shorter than the candidate finishes as usual."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    order: list[str] = []

    def steps(name: str, count: int, seconds: float):
        for step in range(1, count + 1):
            order.append(name)
            clock.now += seconds
            if step == count:
                return f"{name} done"
            try:
                yield
            except Truncate:
                return f"{name} stopped after {step}"

    timer = PairedTimer(lockstep=True, truncate_baseline=True)
    assert timer.block(lambda: steps("base", 5, 0.3), lambda: steps("cand", 2, 0.1)) == (
        "base stopped after 2",
        "cand done",
    )
    assert timer.block(lambda: steps("base", 5, 0.3), lambda: steps("cand", 2, 0.1)) == (
        "base stopped after 2",
        "cand done",
    )
    assert order == ["base", "cand", "base", "cand", "cand", "base", "cand", "base"]
    assert timer.baseline_s == pytest.approx([0.6, 0.6]) and timer.candidate_s == pytest.approx([0.2, 0.2])
    assert timer.block(lambda: steps("base", 1, 0.3), lambda: steps("cand", 3, 0.1)) == ("base done", "cand done")
    assert timer.samples()["baseline_truncated"] is True
    assert (
        PairedTimer(lockstep=True).block(lambda: steps("base", 5, 0.3), lambda: steps("cand", 2, 0.1))[0] == "base done"
    )


def test_a_follower_that_cannot_stop_is_an_error_not_a_silent_overrun():
    def leader():
        yield

    def deaf():  # lets `Truncate` through
        while True:
            yield

    def stubborn():  # swallows it and goes on
        while True:
            try:
                yield
            except Truncate:
                pass

    with pytest.raises(Truncate):
        in_turn([deaf(), leader()], followers=(0,))
    with pytest.raises(RuntimeError, match="went on after Truncate"):
        in_turn([stubborn(), leader()], followers=(0,))


@pytest.mark.parametrize(
    "low, high, verdict",
    [
        (1.01, 1.2, "faster"),
        (0.95, 1.05, "no measurable difference"),
        (0.7, 0.99, "slower"),
        (1.0, 1.3, "no measurable difference"),
    ],
)
def test_faster_only_when_the_whole_interval_lies_above_one(low, high, verdict):
    assert Speedup(ratio=(low + high) / 2, low=low, high=high, blocks=10).verdict == verdict


def test_the_format_shows_both_ends():
    assert Speedup(1.2449, 1.19, 1.291, 12).format() == "1.24x [1.19, 1.29]"


def test_stops_as_soon_as_the_interval_is_narrow_enough(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    blocks = [(clock.work(0.2), clock.work(0.1))] * 3
    speedup = time_paired(blocks, target_half_width=0.05, allowance_s=1e6, min_repeats=6)
    assert speedup.blocks == 9 and speedup.precise and speedup.ratio == pytest.approx(2.0)


def test_a_trial_out_of_time_reports_a_wide_interval_instead_of_failing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    rng = np.random.default_rng(2)

    def noisy(seconds: float):
        return lambda: clock.work(seconds * float(np.exp(rng.normal(0, 0.3))))()

    paired = PairedBlocks(
        lambda pair: pair[0](), lambda pair: pair[1](), target_half_width=0.01, allowance_s=4.0, min_repeats=6
    )
    for pair in [(noisy(0.1), noisy(float(d))) for d in rng.uniform(0.03, 0.3, 8)]:
        paired.run(pair)
    first_pass_ended = clock.now
    speedup = paired.speedup()
    assert not speedup.precise and speedup.half_width > 0.01
    assert speedup.blocks > 8 + 6  # every block once, the repeats the noise estimate needs, then the allowance
    assert 4.0 <= clock.now - first_pass_ended < 4.0 + 2 * 0.3 * 3  # stopped within one block past the allowance


def test_every_block_is_timed_once_even_when_precision_comes_early(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    blocks = [(clock.work(0.2), clock.work(0.1))] * 9
    assert time_paired(blocks, target_half_width=0.5, min_repeats=2).blocks == 11


def test_unpaired_or_empty_timings_are_refused():
    with pytest.raises(ValueError, match="as many baseline as candidate"):
        speedup_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no timed blocks"):
        speedup_interval([], [])
    single = speedup_interval([1.0], [0.5])
    assert single.ratio == 2.0 and math.isinf(single.high) and single.verdict == "no measurable difference"


def test_load_monitor_sees_this_process_and_reports_the_machine():
    with LoadMonitor(threads=1) as monitor:
        sum(i * i for i in range(300_000))
    report = monitor.report()
    assert report["cpus"] >= 1 and report["load_avg_1m"] >= 0
    assert report["other_processes_cpu_cores"] >= 0 and isinstance(report["busy"], bool)
    assert monitor.elapsed > 0


def test_paired_blocks_return_the_candidates_work_and_time_each_block_against_the_baseline(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    baseline_calls: list[int] = []

    def baseline(n: int) -> None:
        baseline_calls.append(n)
        clock.now += 0.3 * n

    def candidate(n: int) -> str:
        clock.now += 0.1 * n
        return f"out{n}"

    paired = PairedBlocks(baseline, candidate, target_half_width=0.05, allowance_s=1e6, min_repeats=2)
    assert [paired.run(n) for n in (1, 2, 3)] == ["out1", "out2", "out3"]
    speedup = paired.speedup()
    assert speedup.ratio == pytest.approx(3.0) and speedup.precise and speedup.blocks == 5
    assert baseline_calls[:3] == [1, 2, 3] and set(baseline_calls[3:]) < {1, 2, 3}  # re-timed: the same work


def test_a_speedup_survives_a_round_trip_through_its_record():
    speedup = Speedup(1.3, 1.2, 1.45, 9, target_half_width=0.05)
    again = Speedup.from_dict(json.loads(json.dumps(speedup.as_dict())))
    assert again == speedup and again.verdict == "faster" and not again.precise


def test_a_record_written_before_the_ratio_of_totals_still_reads():
    legacy = {"median": 1.2, "low": 1.1, "high": 1.3, "blocks": 40, "confidence": 0.95, "target_half_width": 0.05}
    assert Speedup.from_dict(legacy) == Speedup(1.2, 1.1, 1.3, 40, 0.95, 0.05)


def test_with_units_the_speedup_is_of_time_per_unit():
    """A candidate that takes as long but writes twice the tokens is twice as fast per token."""
    base, cand, groups = [1.0, 2.0, 1.0, 2.0], [1.0, 2.0, 1.0, 2.0], [0, 1, 0, 1]
    speedup = speedup_interval(base, cand, groups, units=([10, 20, 10, 20], [20, 40, 20, 40]))
    assert speedup.ratio == pytest.approx(2.0) and speedup.low == pytest.approx(2.0) == speedup.high
    assert speedup.across_work == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="one count of units per timed block"):
        speedup_interval(base, cand, groups, units=([10], [20]))


def test_paired_blocks_count_the_units_each_side_produced(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)

    def decode(seconds: float, tokens: int):
        def run(work: int) -> int:
            clock.now += seconds * work
            return tokens * work

        return run

    paired = PairedBlocks(
        decode(0.2, 10),
        decode(0.2, 5),
        target_half_width=0.05,
        allowance_s=1e6,
        min_repeats=2,
        units=lambda tokens: tokens,
    )
    for work in (1, 2):
        paired.run(work)
    assert paired.speedup().ratio == pytest.approx(0.5)  # as fast per block, half the tokens: half the speed per token
    samples = paired.timer.samples()
    assert samples["baseline_units"][:2] == [10, 20] and samples["candidate_units"][:2] == [5, 10]
