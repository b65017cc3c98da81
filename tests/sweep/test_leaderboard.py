"""Leaderboards from records: deltas, speedups, the summary choice, the files and plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from mee_bench.sweep.boards import pareto_front, summary, task_boards
from mee_bench.sweep.leaderboard import build_leaderboard, cli, summary_table, task_table
from tests.helpers import HARDWARE, RECORDS, REPO, record, write_sweep


def rows_by_policy(board):
    return {(r.measure, r.threshold): r for r in board.rows}


def test_delta_and_speedup_are_against_full_and_oracle_gets_none():
    [board] = task_boards(RECORDS)
    assert board.metric == "bleu" and board.failed == 1
    rows = rows_by_policy(board)
    assert rows[("full", None)].speedup.ratio == pytest.approx(1.0) and rows[("full", None)].delta == 0
    assert rows[("softmax", 0.9)].speedup.ratio == pytest.approx(2.0) and not rows[("softmax", 0.9)].paired
    assert rows[("softmax", 0.9)].delta == pytest.approx(-0.5)
    assert rows[("softmax", 0.5)].speedup.ratio == pytest.approx(4.0)
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
    assert {
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.tex",
        "summary.csv",
        "summary.tex",
        "avg_exit_layer.png",
        "quality_vs_speedup_tatoeba_enfr_mee.png",
    } <= names
    for png in sweep.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (sweep / "leaderboard.md").read_text()
    assert "# Leaderboard: demo" in markdown and "2.00x (unpaired)" in markdown and "analysis only" in markdown
    assert "timed minutes apart" in markdown
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
    assert summary_rows["softmax"]["speedup vs full [95% CI]"] == "2.00x (unpaired)"
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
    done = subprocess.run(
        [sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy imports: []" in done.stdout and (sweep / "leaderboard.md").is_file()


def test_readme_block_is_filled_from_the_leaderboard_and_refilled_in_place(tmp_path):
    sweep = write_sweep(
        tmp_path / "results" / "demo", RECORDS, measures=["full", "softmax", "saturation", "oracle", "lstm"]
    )
    readme = tmp_path / "README.md"
    readme.write_text("# Tool\n\nintro\n\n<!-- leaderboard:start -->\nold numbers\n<!-- leaderboard:end -->\n\nafter\n")
    assert cli([str(sweep), "--readme", str(readme)]) == 2  # the block holds something: replaced only with --force
    assert "old numbers" in readme.read_text()
    assert cli([str(sweep), "--readme", str(readme), "--force"]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# Tool\n\nintro") and text.rstrip().endswith("after")
    assert "### Leaderboard: demo" in text and "2.00x" in text
    assert "](results/demo/avg_exit_layer.png)" in text
    assert cli([str(sweep), "--readme", str(readme), "--force"]) == 0
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    assert cli([str(sweep), "--readme", str(readme)]) == 2


BUSY = {"load_avg_1m": 2.5, "cpus": 2, "cpu_mhz": None, "other_processes_cpu_cores": 1.4, "busy": True}
PAIRED = [
    record("tatoeba_enfr_mee", "full", None, None, 20.0, 10.0, 6.0, paired=(1.0, 0.98, 1.02)),
    record("tatoeba_enfr_mee", "softmax", 0.9, 2, 19.5, 5.0, 3.0, paired=(2.0, 1.9, 2.1)),
    record("tatoeba_enfr_mee", "softmax", 0.5, 2, 19.6, 11.0, 5.9, paired=(0.9, 0.85, 0.95)),
    record("tatoeba_enfr_mee", "saturation", 0.99, 4, 20.0, 9.9, 6.0, paired=(1.01, 0.97, 1.05), load=BUSY),
    record("tatoeba_enfr_mee", "lstm", 0.5, 4, 19.9, 9.0, 5.0, paired=(1.1, 0.8, 1.4, 0.05)),
]


def test_paired_speedups_show_their_interval_and_a_verdict_only_when_the_interval_excludes_one():
    [board] = task_boards(PAIRED)
    header, table = task_table(board)
    column, verdict = header.index("speedup vs full [95% CI]"), header.index("verdict")
    cells = {(row[0], row[1]): (row[column], row[verdict]) for row in table}
    assert cells[("softmax", "0.9")] == ("2.00x [1.90, 2.10]", "faster")
    assert cells[("softmax", "0.5")] == ("0.90x [0.85, 0.95]", "slower")
    assert cells[("saturation", "0.99")] == ("1.01x [0.97, 1.05] (busy machine)", "no measurable difference")
    assert cells[("lstm", "0.5")] == ("1.10x [0.80, 1.40] (imprecise)", "no measurable difference")
    assert cells[("full", "n/a")][1] == "no measurable difference"


def test_the_summary_calls_a_measure_faster_only_when_its_whole_interval_is_above_one():
    boards = task_boards(PAIRED)
    header, table = summary_table(summary(boards, tolerance=1.0), boards)
    verdicts = {row[1]: row[header.index("verdict")] for row in table}
    assert verdicts == {
        "softmax": "faster",
        "saturation": "no measurable difference",
        "lstm": "no measurable difference",
    }


def test_csv_and_latex_carry_both_ends_of_the_interval(tmp_path):
    sweep = write_sweep(tmp_path / "paired", PAIRED, measures=["full", "softmax", "saturation", "lstm"])
    build_leaderboard(sweep)
    with (sweep / "leaderboard.csv").open() as handle:
        rows = {(r["measure"], r["threshold"]): r for r in csv.DictReader(handle)}
    softmax = rows[("softmax", "0.9")]
    assert (float(softmax["speedup_low"]), float(softmax["speedup_vs_full"]), float(softmax["speedup_high"])) == (
        1.9,
        2.0,
        2.1,
    )
    assert (float(softmax["speedup_across_examples_low"]), float(softmax["speedup_across_examples_high"])) == (1.4, 2.6)
    assert softmax["speedup_paired"] == "True" and softmax["speedup_verdict"] == "faster"
    assert rows[("saturation", "0.99")]["busy_machine"] == "True"
    latex = (sweep / "leaderboard.tex").read_text()
    assert "2.00x [1.90, 2.10]" in latex and "0.90x [0.85, 0.95]" in latex
    assert "(unpaired)" not in (sweep / "leaderboard.md").read_text()


@pytest.mark.parametrize(
    "interleaved, truncated, wording",
    [
        ("per step", True, "one generated token at a time, `full` timed over the steps the trial's policy took, in"),
        ("per step", False, "one generated token at a time, in"),
        ("per block", False, "interleaved block by block, in"),
    ],
)
def test_the_method_note_says_how_finely_the_timings_were_interleaved(tmp_path, interleaved, truncated, wording):
    records = [
        {
            **rec,
            "efficiency": {
                **rec["efficiency"],
                "paired_timings": {"interleaved": interleaved, "baseline_truncated": truncated},
            },
        }
        for rec in PAIRED
    ]
    sweep = write_sweep(tmp_path / "paired", records, measures=["full", "softmax", "saturation", "lstm"])
    build_leaderboard(sweep)
    assert wording in (sweep / "leaderboard.md").read_text()


def test_a_record_cut_short_and_a_trial_without_record_are_listed_in_the_task_table(tmp_path):
    records = [
        {
            **record("tatoeba_enfr_mee", "full", None, None, 20.0, 10.0, 6.0),
            "trial_id": "tatoeba_enfr_mee__full__tna__mna__aaa",
        },
        {
            **record("tatoeba_enfr_mee", "softmax", 0.9, 2, 19.5, 5.0, 3.0),
            "trial_id": "tatoeba_enfr_mee__softmax__t0.9__m2__bbb",
        },
    ]
    write_sweep(tmp_path, records)
    cut = tmp_path / "records" / "tatoeba_enfr_mee__softmax__t0.9__m2__bbb.json"
    cut.write_text(cut.read_text()[:40])
    trials = [r["trial_id"] for r in records] + [
        "tatoeba_enfr_mee__softmax__t0.5__m3__ccc",
        "squad_mee__full__tna__mna__ddd",
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"fingerprint": "x", "config": {"name": "demo"}, "trials": trials}))
    build_leaderboard(tmp_path)
    board = (tmp_path / "leaderboard.md").read_text()
    table_rows = [line for line in board.splitlines() if line.startswith("| ")]
    unreadable = [row for row in table_rows if "unreadable record" in row]
    missing = [row for row in table_rows if "no record: the sweep did not finish it" in row]
    assert (
        len(unreadable) == 1
        and "| softmax " in unreadable[0]
        and "| 0.9 " in unreadable[0]
        and str(cut) in unreadable[0]
    )
    assert len(missing) == 2 and any("| 0.5 " in row and "| 3 " in row for row in missing)
    assert "## squad_mee" in board  # a task with no readable record still gets its table
    assert "3 trial(s) of this sweep have no result" in board
    with (tmp_path / "leaderboard.csv").open() as handle:
        problems = {
            (r["task"], r["measure"], r["threshold"], r["min_exit_layer"]): r["problem"] for r in csv.DictReader(handle)
        }
    assert problems[("tatoeba_enfr_mee", "full", "", "")] == ""  # a trial with a result has no problem
    assert problems[("tatoeba_enfr_mee", "softmax", "0.5", "3")].startswith("no record")
    assert problems[("tatoeba_enfr_mee", "softmax", "0.9", "2")].startswith("unreadable record")
    assert problems[("squad_mee", "full", "", "")].startswith("no record")
    latex = (tmp_path / "leaderboard.tex").read_text()
    assert latex.count("no record: the sweep did not finish it") == 2 and "unreadable record" in latex


def test_a_damaged_manifest_is_named_with_the_fix(tmp_path, capsys):
    write_sweep(tmp_path, RECORDS)
    (tmp_path / "sweep.json").write_text('{"fingerprint": "x", "conf')
    assert cli([str(tmp_path)]) == 2
    assert f"the sweep manifest {tmp_path / 'sweep.json'} cannot be read" in capsys.readouterr().err


def test_pruned_checks_are_stated_in_the_measure_label():
    pruned = record("tatoeba_enfr_mee", "softmax", 0.7, 2, 19.0, 4.0, 2.5)
    pruned["config"]["policy"] = {"measure": "softmax", "vocab_top_k": 64}
    [board] = task_boards([RECORDS[0], RECORDS[1], pruned])
    labels = [cells[0] for cells in task_table(board)[1]]
    assert "softmax, top-64 checks" in labels and "softmax" in labels  # the unpruned row keeps its plain label


def test_the_machine_line_says_how_much_cpu_other_processes_took_during_the_trials(tmp_path):
    quiet = {**BUSY, "other_processes_cpu_cores": 0.05, "busy": False}
    hogged = {**BUSY, "other_processes_cpu_cores": 1.02, "busy": False}  # a hog on the spare core: loaded, not short
    records = [
        {**rec, "efficiency": {**rec["efficiency"], "load": load}}
        for rec, load in zip(PAIRED, [quiet, hogged, hogged, BUSY, hogged])
    ]
    sweep = write_sweep(tmp_path / "loaded", records, measures=["full", "softmax", "saturation", "lstm"])
    build_leaderboard(sweep)
    assert (
        "up to 1 trial(s) ran at once; other processes took 1.02 of the 2 CPUs during a trial (median; 0.05-1.40)."
        in (sweep / "leaderboard.md").read_text()
    )
    unloaded = write_sweep(
        tmp_path / "unloaded", [record("tatoeba_enfr_mee", "full", None, None, 20.0, 10.0, 6.0)], measures=["full"]
    )
    build_leaderboard(unloaded)
    assert "up to 1 trial(s) ran at once." in (unloaded / "leaderboard.md").read_text()
