"""benchmarks/compare_speedups.py: two sweeps agree when their paired intervals overlap."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO, record, write_sweep

spec = importlib.util.spec_from_file_location("compare_speedups", REPO / "benchmarks" / "compare_speedups.py")
compare_speedups = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_speedups)


def sweep(tmp_path, name, softmax, saturation):
    return write_sweep(
        tmp_path / name,
        [
            record("t", "full", None, None, 20.0, 10.0, 6.0, paired=(1.0, 0.99, 1.01)),
            record("t", "softmax", 0.9, 2, 19.5, 5.0, 3.0, paired=softmax),
            record("t", "saturation", 0.99, 4, 20.0, 10.0, 6.0, paired=saturation),
        ],
    )


def test_overlapping_intervals_agree_and_never_exiting_rows_are_checked_at_one(tmp_path):
    idle = sweep(tmp_path, "idle", (2.0, 1.9, 2.1), (1.0, 0.97, 1.03))
    busy = sweep(tmp_path, "busy", (1.8, 1.6, 1.95), (1.08, 1.02, 1.12))
    text, summary = compare_speedups.compare(idle, busy)
    assert summary["rows"] == 3 and summary["intervals_overlap"] == 3
    assert summary["never_exiting_rows"] == 1 and summary["never_exiting_rows_at_one"] == 0
    assert "1.00x within: NO" in text
    assert summary["full_against_itself_at_one"] == 2  # `full` against itself, in both runs
    apart = sweep(tmp_path, "apart", (1.5, 1.4, 1.6), (1.0, 0.98, 1.02))
    assert compare_speedups.compare(idle, apart)[1]["intervals_overlap"] == 2


def test_a_never_exiting_row_is_checked_against_what_its_own_checks_cost(tmp_path):
    def with_checks(name, saturation):
        directory = sweep(tmp_path, name, (2.0, 1.9, 2.1), saturation)
        path = next((directory / "records").glob("t-saturation-*.json"))
        rec = json.loads(path.read_text())
        rec["efficiency"].update(measure_ms=30.0, encoder_ms=100.0, decoder_ms=900.0)  # checks: 3% of its time
        path.write_text(json.dumps(rec))
        return directory

    idle = sweep(tmp_path, "idle", (2.0, 1.9, 2.1), (1.0, 0.97, 1.03))
    text, summary = compare_speedups.compare(idle, with_checks("costly", (0.97, 0.96, 0.98)))
    assert summary["never_exiting_rows_at_one"] == 0 and summary["never_exiting_rows_at_their_checks_cost"] == 1
    assert "1 - checks' share = 0.970 within: yes" in text
    text, summary = compare_speedups.compare(idle, with_checks("biased", (0.90, 0.88, 0.92)))
    assert summary["never_exiting_rows_at_their_checks_cost"] == 0 and "within: NO" in text
    assert "no check time recorded" in compare_speedups.compare(idle, idle)[0]


def test_sweeps_without_shared_paired_trials_are_refused(tmp_path):
    idle = sweep(tmp_path, "idle", (2.0, 1.9, 2.1), (1.0, 0.97, 1.03))
    other = write_sweep(tmp_path / "other", [record("u", "full", None, None, 20.0, 10.0, 6.0)])
    with pytest.raises(ValueError, match="share no trial with paired timing"):
        compare_speedups.compare(idle, other)
