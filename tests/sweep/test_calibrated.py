"""`calibrated` sweep entries: a calibrated policy as a trial, stable ids for the others, and
leaderboard rows that show the guarantee."""

from __future__ import annotations

import json

import pytest

from mee_bench.engine.policy import POLICY_FILE, ExitPolicy
from mee_bench.sweep.boards import task_boards
from mee_bench.sweep.config import ConfigError, Trial, expand_grid, to_config
from mee_bench.sweep.leaderboard import task_table
from mee_bench.sweep.store import trial_id
from tests.helpers import record

CALIBRATED = ExitPolicy("softmax", 0.8, 2)
SUMMARY = {"delta": 0.1, "epsilon": 0.05, "chosen_threshold": 0.8, "test_risk": 0.07, "within_delta": True}


def sweep(**changes):
    return to_config(
        {"name": "x", "tasks": ["a"], "measures": ["full"], "carbon": {"country_iso_code": "FRA"}, **changes}
    )


def test_a_calibrated_entry_adds_one_trial_per_task_running_its_policy(tmp_path):
    (tmp_path / POLICY_FILE).write_text(json.dumps({"policy": CALIBRATED.as_dict(), "calibration": SUMMARY}))
    config = sweep(tasks=["a", "b"], calibrated=[str(tmp_path)])
    trials = [t for t in expand_grid(config) if t.measure == "calibrated"]
    assert [(t.task, t.threshold, t.min_exit_layer) for t in trials] == [("a", 0.8, 2), ("b", 0.8, 2)]
    assert all(t.policy(config) == CALIBRATED for t in trials)


def test_a_calibrated_entry_that_cannot_be_read_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="`calibrated` entry .*no exit policy at"):
        sweep(calibrated=[str(tmp_path / "missing.json")])


def test_calibrated_trials_of_different_files_have_different_ids():
    assert trial_id(Trial("a", "calibrated", 0.5, 2, calibration="/c.json"), {"s": 1}) != trial_id(
        Trial("a", "calibrated", 0.5, 2), {"s": 1}
    )


def test_leaderboard_rows_show_delta_epsilon_threshold_and_the_test_verdict():
    calibrated = record("t", "calibrated", 0.8, 2, 19.0, 5.0, 3.0)
    calibrated["config"]["policy"] = CALIBRATED.as_dict()
    calibrated["calibration"] = SUMMARY
    [board] = task_boards([record("t", "full", None, None, 20.0, 10.0, 6.0), calibrated])
    _, rows = task_table(board)
    [row] = [r for r in rows if r[0].startswith("calibrated")]
    assert row[0] == "calibrated softmax (delta 0.1, epsilon 0.05, test risk within delta: yes)"
    assert row[1] == "0.8"
    assert "2.00x (unpaired)" in row  # same hardware as `full` (10 vs 5 ms/token)
