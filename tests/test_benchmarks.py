"""The benchmarks no other test runs, end to end at a few sentences on the embedded default model:
they finish, and their figures land where the benchmark says they do."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    yield importlib.import_module
    for name in (
        "pruned_checks",
        "token_profile",
        "policy_speed",
        "decode_speed",
        "first_read",
        "pairing_check",
        "busy_check",
        "cpu_hog",
    ):
        sys.modules.pop(name, None)


def test_pruned_checks_compares_every_policy_with_its_unpruned_run(benchmark, tmp_path):
    out = tmp_path / "pruned.json"
    assert (
        benchmark("pruned_checks").main(["--sentences", "6", "--batch", "3", "--top-k", "2", "64", "--out", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["policies"]
    assert {(row["policy"], row["vocab_top_k"]) for row in rows} == {
        (policy, k)
        for policy in ("softmax 0.5, from 2", "softmax 0.9, from 2", "monotonic_heuristic 0.9, from 4")
        for k in (2, 64)
    }
    for row in rows:
        assert row["decisions_compared"] > 0 and 0 <= row["decisions_differing"] <= 1
        assert 1 <= row["avg_exit_layer"] <= 6 and 1 <= row["avg_exit_layer_unpruned"] <= 6
    softmax = {row["vocab_top_k"]: row for row in rows if row["policy"] == "softmax 0.5, from 2"}
    # over two tokens, top-1 minus top-2 is inflated most: pruning to 2 exits earliest
    assert softmax[2]["avg_exit_layer"] <= softmax[64]["avg_exit_layer"] <= softmax[64]["avg_exit_layer_unpruned"]


def test_token_profile_puts_each_head_read_where_it_happened(benchmark, tmp_path):
    out = tmp_path / "profile.json"
    assert benchmark("token_profile").main(["--sentences", "2", "--out", str(out)]) == 0
    policies = {name: result["ms_per_token"] for name, result in json.loads(out.read_text())["policies"].items()}
    rounded, full, pruned = "head: check, int8", "head: check, full", "head: check, pruned"
    assert policies["softmax 0.5, from 2"][full] > 0 and policies["softmax 0.5, from 2"][rounded] == 0
    for name in ("softmax 0.5, from 2, top-64", "monotonic_heuristic 0.9, from 4, top-64"):
        assert policies[name][rounded] > 0 and policies[name][full] == 0
    assert policies["softmax 0.5, from 2, top-64"][pruned] > 0
    for name in ("full", "lstm 0.5, from 2"):
        assert policies[name][full] == policies[name][rounded] == policies[name][pruned] == 0
    assert all(parts["layers"] > parts["head: token choice"] > 0 for parts in policies.values())


def test_policy_speed_prices_each_verification_width_and_prints_it_with_the_table(benchmark):
    from mee_bench.engine.loading import load_generator
    from mee_bench.paths import DEFAULT_MODEL_DIR
    from mee_bench.study import bench_tables

    policy_speed = benchmark("policy_speed")
    generator = load_generator(DEFAULT_MODEL_DIR, "float32", "cpu")
    costs = policy_speed.width_costs(generator, "translate English to French: The cat sleeps.", repeats=2)
    assert list(costs) == [str(w) for w in policy_speed.WIDTHS]
    assert all(cost["layers_ms"] > 0 and cost["head_ms"] > 0 for cost in costs.values())
    row = {
        "policy": "full",
        "speedup_vs_full": "1 (baseline)",
        "layers_per_token": 6.0,
        "identical_to_full": True,
        "acceptance_rate": None,
        "mean_accepted_draft": None,
    }
    result = {
        "batches": [{"batch": 1, "policies": [row]}],
        "machine": {"threads": 1},
        "settings": {"sentences": 1, "model": "m", "dtype": "float32"},
    }
    assert "over w positions" not in bench_tables.policy_speed(result)  # a record from before widths were priced
    with_widths = bench_tables.policy_speed({**result, "width_cost": costs})
    assert bench_tables.width_line(costs) in with_widths and "8: " in bench_tables.width_line(costs)


def test_decode_speed_reports_a_check_cost_with_an_interval_around_its_median(benchmark):
    import numpy as np

    median_interval = benchmark("decode_speed").median_interval
    noisy = 0.1 + np.random.default_rng(0).normal(0.0, 0.05, 28)  # 28 rounds, as 14 repeats give
    value, low, high = median_interval(noisy)
    assert value == np.median(noisy) and low < value < high
    assert low < 0.1 < high and high - low < 0.1  # holds the true cost, narrower than the noise's spread
    assert median_interval(noisy) == (value, low, high)  # seeded


def test_first_read_times_both_rounded_heads_in_the_loop_on_the_same_work(benchmark, tmp_path):
    out = tmp_path / "first_read.json"
    assert benchmark("first_read").main(["--tiny", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["shapes"]
    assert row["shape"] == "tiny" and row["identical_to_full"]  # never exiting: checks change no token
    for comparison in ("int8_vs_float16", "int8_vs_full", "float16_vs_full"):
        figures = row[comparison]
        assert figures["low"] <= figures["ratio"] <= figures["high"] and figures["blocks"] >= 4


def test_pairing_check_times_both_methods_every_round_and_reads_the_shift_from_them(benchmark, tmp_path):
    out = tmp_path / "pairing.json"
    pairing_check = benchmark("pairing_check")
    assert (
        pairing_check.main(["--sentences", "2", "--rounds", "2", "--policies", "fixed", "full", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["policies"]
    assert [row["policy"] for row in rows] == ["fixed", "full"]
    for row in rows:
        lockstep, whole = row["ratios"]["lockstep"], row["ratios"]["whole examples"]
        assert len(lockstep) == len(whole) == 2 and all(ratio > 0 for ratio in lockstep + whole)
        assert row["shift"] == pytest.approx((lockstep[0] / whole[0] + lockstep[1] / whole[1]) / 2 - 1)
        assert row["low"] <= row["shift"] <= row["high"]


def test_pairing_check_interval_holds_a_known_shift_and_narrows_with_rounds(benchmark):
    import numpy as np

    shift_interval = benchmark("pairing_check").shift_interval
    rng = np.random.default_rng(0)
    whole = 1.2 * np.exp(rng.normal(0, 0.03, 40))
    lockstep = whole * 1.02 * np.exp(rng.normal(0, 0.01, 40))  # a true shift of +2%
    few, many = shift_interval(lockstep[:4], whole[:4]), shift_interval(lockstep, whole)
    assert many["low"] < 0.02 < many["high"] and many["low"] > 0  # holds the shift and tells it from none
    assert many["high"] - many["low"] < few["high"] - few["low"]
    assert shift_interval([1.1, 1.1], [1.0, 1.0])["shift"] == pytest.approx(0.1)


def test_busy_check_toggles_the_hog_round_by_round_and_reads_the_shift_from_paired_rounds(benchmark, tmp_path):
    out = tmp_path / "busy.json"
    busy_check = benchmark("busy_check")
    policies = ["full", "lstm 0.5, from 2"]
    assert (
        busy_check.main(
            [
                "--sentences",
                "2",
                "--rounds",
                "2",
                "--task",
                "tatoeba_enfr_mee",
                "--policies",
                *policies,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [row["policy"] for row in result["policies"]] == policies
    for row in result["policies"]:
        busy, idle = row["ratios"]["busy"], row["ratios"]["idle"]
        assert len(busy) == len(idle) == 2 and all(ratio > 0 for ratio in busy + idle)
        assert row["shift"] == pytest.approx((busy[0] / idle[0] + busy[1] / idle[1]) / 2 - 1)
        assert row["low"] <= row["shift"] <= row["high"]
    others = result["other_processes_cpu_cores"]
    assert len(others["busy"]) == len(others["idle"]) == 2
    # the hog really held a core while the busy rounds ran, and only then
    assert min(others["busy"]) > max(others["idle"]) and result["hog_cores"] > 0.5 and result["hog_visible"]
