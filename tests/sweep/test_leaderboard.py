"""Leaderboards from records: deltas, speedups, the summary choice, the files and plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from mee_bench.engine.measures import MEASURES
from mee_bench.sweep.leaderboard import build_leaderboard, cli, pareto_front, summary, task_boards, task_table
from tests.helpers import REPO

HARDWARE = {"cpu_model": "Test CPU", "cpu_count": 2, "torch_threads": 1, "gpu": None}


def record(task, measure, threshold, layer, quality, ms, avg, status="ok", hardware=HARDWARE, metric="bleu"):
    rec = {
        "trial_id": f"{task}-{measure}-{threshold}-{layer}",
        "status": status,
        "trial": {"task": task, "measure": measure, "threshold": threshold, "min_exit_layer": layer},
        "config": {"model": {"pretrained": "/m/mee-t5-default", "dtype": "float32", "device": "cpu"}, "limit": 8, "batch_size": 1},
        "hardware": hardware,
        "measure_facts": {"analysis_only": MEASURES[measure].analysis_only, "takes_threshold": MEASURES[measure].takes_threshold},
    }
    if status == "ok":
        rec.update(
            metrics={metric: quality, "chrf": quality + 20},
            efficiency={"decode_ms_per_token": ms, "avg_exit_layer": avg, "num_layers": 6},
            energy={"energy_kwh": 2e-6, "emissions_kg_co2eq": 1e-7, "power_source": "estimated",
                    "power_detail": "CPU estimated (TDP x CPU load, TDP 8 W)", "country_iso_code": "FRA"},
        )
    return rec


RECORDS = [
    record("tatoeba_enfr_mee", "full", None, None, 20.0, 10.0, 6.0),
    record("tatoeba_enfr_mee", "softmax", 0.9, 2, 19.5, 5.0, 3.0),  # within 1 point, 2x
    record("tatoeba_enfr_mee", "softmax", 0.5, 2, 15.0, 2.5, 2.0),  # 4x but 5 points worse
    record("tatoeba_enfr_mee", "saturation", 0.99, 4, 17.0, 8.0, 5.0),  # never within 1 point
    record("tatoeba_enfr_mee", "oracle", None, 2, 20.0, 11.0, 2.5),
    record("tatoeba_enfr_mee", "lstm", 0.5, 4, None, None, None, status="failed"),
]


def write_sweep(tmp_path, records, measures=None):
    (tmp_path / "records").mkdir(parents=True)
    for rec in records:
        (tmp_path / "records" / f"{rec['trial_id']}.json").write_text(json.dumps(rec))
    if measures:
        (tmp_path / "sweep.json").write_text(json.dumps({"fingerprint": "x", "config": {"name": "demo", "measures": measures}}))
    return tmp_path


def rows_by_policy(board):
    return {(r.measure, r.threshold): r for r in board.rows}


def test_delta_and_speedup_are_against_full_and_oracle_gets_none():
    [board] = task_boards(RECORDS)
    assert board.metric == "bleu" and board.failed == 1
    rows = rows_by_policy(board)
    assert rows[("full", None)].speedup == pytest.approx(1.0) and rows[("full", None)].delta == 0
    assert rows[("softmax", 0.9)].speedup == pytest.approx(2.0)
    assert rows[("softmax", 0.9)].delta == pytest.approx(-0.5)
    assert rows[("softmax", 0.5)].speedup == pytest.approx(4.0)
    assert rows[("oracle", None)].speedup is None and rows[("oracle", None)].analysis_only
    assert board.rows[0].measure == "full"


def test_analysis_only_comes_from_the_record_not_the_measure_name(tmp_path):
    fixed = record("tatoeba_enfr_mee", "fixed", None, 2, 18.0, 4.0, 2.0)
    fixed["measure_facts"]["analysis_only"] = True
    [board] = task_boards([RECORDS[0], fixed])
    assert rows_by_policy(board)[("fixed", None)].analysis_only
    assert rows_by_policy(board)[("fixed", None)].speedup is None
    old = dict(RECORDS[0])
    del old["measure_facts"]
    with pytest.raises(ValueError, match="has no measure_facts"):
        task_boards([old])


def test_summary_picks_the_fastest_within_one_point_or_none():
    chosen = {item.measure: item for item in summary(task_boards(RECORDS), tolerance=1.0)}
    assert set(chosen) == {"softmax", "saturation"}  # neither full nor the oracle compete
    assert chosen["softmax"].best.threshold == 0.9
    assert chosen["saturation"].best is None
    loose = {item.measure: item for item in summary(task_boards(RECORDS), tolerance=6.0)}
    assert loose["softmax"].best.threshold == 0.5


def test_no_speedup_across_different_hardware_and_no_delta_without_full():
    other = dict(HARDWARE, cpu_model="Other CPU")
    [board] = task_boards([RECORDS[0], record("tatoeba_enfr_mee", "softmax", 0.9, 2, 19.5, 5.0, 3.0, hardware=other)])
    assert rows_by_policy(board)[("softmax", 0.9)].speedup is None
    assert any("different hardware" in note for note in board.notes)
    [alone] = task_boards(RECORDS[1:2])
    assert alone.rows[0].delta is None and alone.rows[0].speedup is None
    assert any("no successful `full`" in note for note in alone.notes)


def test_primary_metric_per_task():
    squad = [record("squad_mee", "full", None, None, 50.0, 10.0, 6.0, metric="f1")]
    squad[0]["metrics"]["exact_match"] = 40.0
    assert task_boards(squad)[0].metric == "f1"
    assert task_boards(squad)[0].metric_names[0] == "f1"


def test_pareto_front():
    points = [(1.0, 20.0), (2.0, 19.5), (4.0, 15.0), (1.6, 17.0), (2.0, 18.0), (0.9, 20.0)]
    assert pareto_front(points) == [(1.0, 20.0), (2.0, 19.5), (4.0, 15.0)]


def test_build_writes_markdown_csv_latex_and_plots(tmp_path):
    sweep = write_sweep(tmp_path / "demo", RECORDS, measures=["full", "softmax", "saturation", "oracle", "lstm"])
    paths = build_leaderboard(sweep)
    names = {p.name for p in paths}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.tex", "summary.csv", "summary.tex",
            "avg_exit_layer.png", "quality_vs_speedup_tatoeba_enfr_mee.png"} <= names
    for png in sweep.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (sweep / "leaderboard.md").read_text()
    assert "# Leaderboard: demo" in markdown and "2.00x" in markdown and "analysis only" in markdown
    assert "estimated" in markdown and "1 trial(s) failed" in markdown
    assert "limit 8 examples per task, batch size 1" in markdown
    assert "\\toprule" in (sweep / "leaderboard.tex").read_text()
    with (sweep / "leaderboard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["measure"] for r in rows] == ["full", "softmax", "softmax", "saturation", "oracle"]
    softmax_09 = next(r for r in rows if r["measure"] == "softmax" and r["threshold"] == "0.9")
    assert float(softmax_09["speedup_vs_full"]) == pytest.approx(2.0)
    assert float(softmax_09["delta_vs_full"]) == pytest.approx(-0.5)
    assert next(r for r in rows if r["measure"] == "oracle")["speedup_vs_full"] == ""
    with (sweep / "summary.csv").open() as handle:
        summary_rows = {r["measure"]: r for r in csv.DictReader(handle)}
    assert summary_rows["softmax"]["speedup vs full"] == "2.00x"
    assert summary_rows["saturation"]["threshold"] == "none"


def test_cli_rebuilds_and_refuses_empty_dirs(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "demo", RECORDS)
    assert cli([str(sweep)]) == 0
    (sweep / "leaderboard.md").unlink()
    assert cli([str(sweep), "--tolerance", "6"]) == 0
    assert (sweep / "leaderboard.md").is_file()
    assert "within 6 quality point(s)" in (sweep / "leaderboard.md").read_text()
    assert cli([str(tmp_path / "missing")]) == 2
    empty = write_sweep(tmp_path / "empty", [RECORDS[-1]])
    assert cli([str(empty)]) == 2
    assert "no successful trial records" in capsys.readouterr().err


@pytest.mark.slow
def test_the_leaderboard_command_imports_neither_torch_nor_transformers_nor_lm_eval(tmp_path):
    sweep = write_sweep(tmp_path / "demo", RECORDS, measures=["full", "softmax", "saturation", "oracle", "lstm"])
    code = (
        "import sys; from mee_bench.cli import main; status = main(['leaderboard', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]; "
        "print('heavy imports:', heavy); sys.exit(status or bool(heavy))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy imports: []" in done.stdout and (sweep / "leaderboard.md").is_file()


def test_readme_block_is_filled_from_the_leaderboard_and_refilled_in_place(tmp_path):
    sweep = write_sweep(tmp_path / "results" / "demo", RECORDS, measures=["full", "softmax", "saturation", "oracle", "lstm"])
    readme = tmp_path / "README.md"
    readme.write_text("# Tool\n\nintro\n\n<!-- leaderboard:start -->\nold numbers\n<!-- leaderboard:end -->\n\nafter\n")
    assert cli([str(sweep), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# Tool\n\nintro") and text.rstrip().endswith("after")
    assert "### Leaderboard: demo" in text and "2.00x" in text
    assert "](results/demo/avg_exit_layer.png)" in text
    assert cli([str(sweep), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    assert cli([str(sweep), "--readme", str(readme)]) == 2


def test_pruned_checks_are_stated_in_the_measure_label():
    pruned = record("tatoeba_enfr_mee", "softmax", 0.7, 2, 19.0, 4.0, 2.5)
    pruned["config"]["policy"] = {"measure": "softmax", "vocab_top_k": 64}
    [board] = task_boards([RECORDS[0], RECORDS[1], pruned])
    labels = [cells[0] for cells in task_table(board)[1]]
    assert "softmax, top-64 checks" in labels and "softmax" in labels  # the unpruned row keeps its plain label
