"""Paired timing: interval coverage, interleaving, the verdict rule, and the time allowance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mee_bench import timing
from mee_bench.timing import LoadMonitor, PairedBlocks, PairedTimer, Speedup, speedup_interval, time_paired


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
    rng = np.random.default_rng(0)
    true_ratio, draws, blocks = 1.3, 300, 15
    covered = 0
    for draw in range(draws):
        base = 0.1 * np.exp(rng.normal(0, 0.05, blocks))
        cand = 0.1 / true_ratio * np.exp(rng.normal(0, 0.05, blocks))
        speedup = speedup_interval(base, cand, seed=draw)
        covered += speedup.low <= true_ratio <= speedup.high
    assert 0.88 <= covered / draws <= 0.995


def test_the_interval_narrows_with_more_blocks_and_holds_the_median():
    rng = np.random.default_rng(1)
    base = 0.2 * np.exp(rng.normal(0, 0.1, 200))
    cand = 0.1 * np.exp(rng.normal(0, 0.1, 200))
    few, many = speedup_interval(base[:8], cand[:8]), speedup_interval(base, cand)
    assert many.half_width < few.half_width
    assert many.low < 2.0 < many.high and many.low <= many.median <= many.high


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


@pytest.mark.parametrize(
    "low, high, verdict",
    [(1.01, 1.2, "faster"), (0.95, 1.05, "no measurable difference"), (0.7, 0.99, "slower"), (1.0, 1.3, "no measurable difference")],
)
def test_faster_only_when_the_whole_interval_lies_above_one(low, high, verdict):
    assert Speedup(median=(low + high) / 2, low=low, high=high, blocks=10).verdict == verdict


def test_the_format_shows_both_ends():
    assert Speedup(1.2449, 1.19, 1.291, 12).format() == "1.24x [1.19, 1.29]"


def test_stops_as_soon_as_the_interval_is_narrow_enough(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    blocks = [(clock.work(0.2), clock.work(0.1))] * 3
    speedup = time_paired(blocks, target_half_width=0.05, allowance_s=1e6, min_blocks=6)
    assert speedup.blocks == 6 and speedup.precise and speedup.median == pytest.approx(2.0)


def test_a_trial_out_of_time_reports_a_wide_interval_instead_of_failing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    rng = np.random.default_rng(2)
    blocks = [(clock.work(0.1), clock.work(float(d))) for d in rng.uniform(0.03, 0.3, 8)]
    speedup = time_paired(blocks, target_half_width=0.01, allowance_s=2.0, min_blocks=6)
    assert not speedup.precise and speedup.half_width > 0.01
    assert speedup.blocks >= 8  # every block once, then it stopped at the allowance
    assert clock.now < 2.0 + 2 * 0.4  # at most one block past the allowance


def test_every_block_is_timed_once_even_when_precision_comes_early(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    blocks = [(clock.work(0.2), clock.work(0.1))] * 9
    assert time_paired(blocks, target_half_width=0.5, min_blocks=2).blocks == 9


def test_unpaired_or_empty_timings_are_refused():
    with pytest.raises(ValueError, match="as many baseline as candidate"):
        speedup_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no timed blocks"):
        speedup_interval([], [])
    single = speedup_interval([1.0], [0.5])
    assert single.median == 2.0 and math.isinf(single.high) and single.verdict == "no measurable difference"


def test_load_monitor_sees_this_process_and_reports_the_machine():
    with LoadMonitor(threads=1) as monitor:
        sum(i * i for i in range(300_000))
    report = monitor.report()
    assert report["cpus"] >= 1 and report["load_avg_1m"] >= 0
    assert report["other_processes_cpu_cores"] >= 0 and isinstance(report["busy"], bool)
    assert monitor.elapsed > 0


def test_paired_blocks_return_the_candidates_work_and_time_each_block_against_the_baseline(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    baseline_calls: list[int] = []

    def baseline(n: int) -> None:
        baseline_calls.append(n)
        clock.now += 0.3 * n

    def candidate(n: int) -> str:
        clock.now += 0.1 * n
        return f"out{n}"

    paired = PairedBlocks(baseline, candidate, target_half_width=0.05, allowance_s=1e6, min_blocks=4)
    assert [paired.run(n) for n in (1, 2, 3)] == ["out1", "out2", "out3"]
    speedup = paired.speedup()
    assert speedup.median == pytest.approx(3.0) and speedup.precise and speedup.blocks == 4
    assert baseline_calls == [1, 2, 3, 1]  # the extra round starts over the same work


def test_a_speedup_survives_a_round_trip_through_its_record():
    speedup = Speedup(1.3, 1.2, 1.45, 9, target_half_width=0.05)
    again = Speedup.from_dict(json.loads(json.dumps(speedup.as_dict())))
    assert again == speedup and again.verdict == "faster" and not again.precise
