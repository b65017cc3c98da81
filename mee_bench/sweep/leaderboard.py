"""Leaderboards from a sweep's records: what a researcher pastes into a paper.

Per task: every configuration with its quality, the change against `full`, average exit
layer, speedup against `full`, ms/token, energy and CO2 (the comparisons: `boards.py`; the
figures: `leaderboard_plots.py`), as Markdown, LaTeX and CSV, and the summary of the fastest
configuration within a quality tolerance. Everything is rebuilt from the JSON records, so
`mee-bench leaderboard DIR` can be rerun at any time, without torch. Tables call the confidence
measure a "measure" and the whole configured exit rule (measure, threshold, minimum exit layer)
a "policy".
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from mee_bench.formatting import MISSING, fixed, significant
from mee_bench.markdown import block_content, fill_block, markers, relocate
from mee_bench.sweep.boards import Row, SummaryRow, TaskBoard, summary, task_boards
from mee_bench.sweep.leaderboard_plots import plot_exit_layers, plot_quality_vs_speedup
from mee_bench.sweep.store import MANIFEST, SweepError, read_manifest, scan_records

BLOCK = "leaderboard"  # a README's `<!-- leaderboard:start -->` ... `<!-- leaderboard:end -->`


def _measure_label(row: Row) -> str:
    if row.analysis_only:
        return f"{row.measure} (analysis only)"
    if row.calibration is None:
        return row.measure + row.options
    within = row.calibration.get("within_delta")
    verdict = MISSING if within is None else ("yes" if within else "no")
    return (
        f"{row.measure} (delta {significant(row.calibration.get('delta'))}, epsilon "
        f"{significant(row.calibration.get('epsilon'))}, "
        f"test risk within delta: {verdict})"
    )


def _speedup(row: Row) -> str:
    if row.analysis_only:
        return "analysis only"
    if row.speedup is None:
        return MISSING
    text = row.speedup.format() if row.paired else f"{row.speedup.ratio:.2f}x (unpaired)"
    if row.paired and not row.speedup.precise:
        text += " (imprecise)"
    return text + (" (busy machine)" if row.busy else "")


def _verdict(row: Row) -> str:
    """Faster or slower than `full` only when the whole paired interval says so."""
    if row.analysis_only or row.speedup is None or not row.paired:
        return MISSING
    return row.speedup.verdict


def task_table(board: TaskBoard) -> tuple[list[str], list[list[str]]]:
    """Formatted header and rows of one task's leaderboard (shared by Markdown and LaTeX)."""
    header = [
        "measure",
        "threshold",
        "min exit layer",
        *board.metric_names,
        f"delta {board.metric} vs full",
        "avg exit layer",
        "speedup vs full [95% CI]",
        "verdict",
        "ms/token",
        "energy (Wh)",
        "CO2 (g)",
        "power",
    ]
    rows = []
    for row in board.rows:
        rows.append(
            [
                _measure_label(row),
                significant(row.threshold),
                MISSING if row.min_exit_layer is None else str(row.min_exit_layer),
                *(fixed(row.metrics.get(name)) for name in board.metric_names),
                MISSING if row.delta is None else f"{row.delta:+.2f}",
                fixed(row.avg_exit_layer),
                _speedup(row),
                _verdict(row),
                fixed(row.ms_per_token),
                significant(row.energy_wh),
                significant(row.co2_g),
                row.power,
            ]
        )
    return header, rows


def summary_table(rows: list[SummaryRow], boards: list[TaskBoard]) -> tuple[list[str], list[list[str]]]:
    metrics = {b.task: b.metric for b in boards}
    untrained = {b.task for b in boards if b.untrained}
    header = [
        "task",
        "measure",
        "threshold",
        "min exit layer",
        "quality",
        "delta vs full",
        "speedup vs full [95% CI]",
        "verdict",
        "avg exit layer",
    ]
    table = []
    for item in rows:
        best, task = item.best, item.task + (" (model untrained for it)" if item.task in untrained else "")
        if best is None:
            table.append([task, item.measure, *["none"] * 7])
            continue
        table.append(
            [
                task,
                item.measure + best.options,
                significant(best.threshold),
                MISSING if best.min_exit_layer is None else str(best.min_exit_layer),
                f"{fixed(best.quality)} {metrics[item.task]}",
                f"{best.delta:+.2f}",
                _speedup(best),
                _verdict(best),
                fixed(best.avg_exit_layer),
            ]
        )
    return header, table


def _csv_rows(boards: list[TaskBoard], absent: dict[str, str]) -> tuple[list[str], list[list]]:
    """One row per trial with a result, then one per trial without (its grid point and why, under `problem`)."""
    metric_names = sorted({n for b in boards for n in b.metric_names})
    header = [
        "task",
        "measure",
        "threshold",
        "min_exit_layer",
        "primary_metric",
        "quality",
        "delta_vs_full",
        *metric_names,
        "avg_exit_layer",
        "speedup_vs_full",
        "speedup_low",
        "speedup_high",
        "speedup_across_examples_low",
        "speedup_across_examples_high",
        "speedup_paired",
        "speedup_verdict",
        "busy_machine",
        "decode_ms_per_token",
        "energy_wh",
        "co2_g",
        "power_source",
        "analysis_only",
        "model_untrained_for_task",
        "problem",
    ]
    rows = []
    for board in boards:
        for r in board.rows:
            rows.append(
                [
                    r.task,
                    r.measure,
                    r.threshold,
                    r.min_exit_layer,
                    board.metric,
                    r.quality,
                    r.delta,
                    *(r.metrics.get(n) for n in metric_names),
                    r.avg_exit_layer,
                    *((r.speedup.ratio, r.speedup.low, r.speedup.high) if r.speedup else (None,) * 3),
                    *((r.speedup.across_work if r.speedup and r.speedup.across_work else None) or (None, None)),
                    r.paired,
                    _verdict(r) if r.speedup and r.paired else None,
                    r.busy,
                    r.ms_per_token,
                    r.energy_wh,
                    r.co2_g,
                    r.power,
                    r.analysis_only,
                    board.untrained,
                    None,
                ]
            )
    for trial, problem in absent.items():
        task, measure, threshold, layer = _grid_point(trial)
        rows.append([task, measure, threshold, layer, *[None] * (len(header) - 5), problem])
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def _context(records: list[dict]) -> list[str]:
    """The facts a reader needs to trust the numbers: model, machine, how power was obtained."""
    ok = [r for r in records if r.get("status") == "ok"]
    lines = []
    if ok:
        first = ok[0]
        hw, energy = first.get("hardware", {}), first.get("energy", {})
        lines.append(
            f"Model: `{Path(first['config']['model']['pretrained']).name}` "
            f"({first['config']['model']['dtype']}, {first['config']['model']['device']}); "
            f"limit {first['config'].get('limit') or 'none'} examples per task, "
            f"batch size {first['config'].get('batch_size', 'unknown')} (speedups shrink as batches "
            f"grow: a batch runs until its last row exits; the paper measures at batch size 1)."
        )
        workers = max(r.get("worker", {}).get("concurrent_workers", 1) for r in ok)
        lines.append(
            f"Machine: {hw.get('cpu_model')}, {hw.get('torch_threads')} torch thread(s) per trial"
            f"{', GPU ' + hw['gpu'] if hw.get('gpu') else ''}; up to {workers} trial(s) ran at once"
            f"{_others_load(ok)}."
        )
        sources = sorted({r.get("energy", {}).get("power_source", "unknown") for r in ok})
        lines.append(
            f"Energy and CO2: CodeCarbon, grid of {energy.get('country_iso_code')}; power was "
            f"**{' / '.join(sources)}** ({energy.get('power_detail', 'no detail')})."
        )
    per_step = bool(ok) and all(
        r.get("efficiency", {}).get("paired_timings", {}).get("interleaved") == "per step" for r in ok
    )
    truncated = per_step and all(r["efficiency"]["paired_timings"].get("baseline_truncated") for r in ok)
    interleaving = (
        "the two taking turns one generated token at a time" if per_step else "interleaved block by block"
    ) + (", `full` timed over the steps the trial's policy took" if truncated else "")
    lines.append(
        "Speedup: each trial decoded its examples in blocks and `full` decoded the same blocks in the "
        f"same worker, {interleaving}, in alternating order, then some blocks again; the speedup is `full`'s time per "
        "generated token over all examples divided by the trial's, and its 95% interval is how far timing noise "
        "could move it on these examples "
        "(estimated from the blocks timed twice or more). How much the gain depends on which examples "
        "were drawn is a separate interval, in the CSV (`speedup_across_examples_*`). A measure is called "
        'faster or slower than `full` only when its whole interval lies above or below 1; "(imprecise)" '
        "marks a trial that ran out of its timing allowance before its interval reached the asked precision, "
        '"(busy machine)" one during which other processes took CPU it was meant to have. The oracle '
        "runs every layer and reports where it could have exited: analysis only."
    )
    if any("paired_speedup" not in r.get("efficiency", {}) for r in ok):
        lines.append(
            'Rows marked "(unpaired)" come from records without paired timing: `full`\'s ms/token '
            "divided by the trial's, timed minutes apart, so machine drift lands in them."
        )
    failed = len(records) - len(ok)
    if failed:
        lines.append(f"{failed} trial(s) failed and are not shown; their records in `records/` hold the errors.")
    return lines


def _others_load(records: list[dict]) -> str:
    """How much CPU other processes took while the trials ran (a loaded machine shows here even
    when no trial was short of its own cores), or nothing when the records hold no load."""
    loads = [r["efficiency"]["load"] for r in records if "load" in r.get("efficiency", {})]
    if not loads:
        return ""
    others = sorted(load["other_processes_cpu_cores"] for load in loads)
    return (
        f"; other processes took {statistics.median(others):.2f} of the {loads[0]['cpus']} CPUs during "
        f"a trial (median; {others[0]:.2f}-{others[-1]:.2f})"
    )


def absent_trials(output_dir: Path, records: list[dict], unreadable: dict[Path, str], manifest: dict) -> dict[str, str]:
    """Trial id -> why the tables hold no result for it: an unreadable record, or none at all for a
    trial of the sweep's grid (the manifest lists it), as an interrupted sweep leaves them."""
    absent = {
        path.stem: f"unreadable record ({reason}): delete {path} and rerun the sweep"
        for path, reason in unreadable.items()
    }
    present = {record["trial_id"] for record in records}
    for trial in manifest.get("trials", []):
        if trial not in present and trial not in absent:
            absent[trial] = "no record: the sweep did not finish it; rerun the sweep to resume"
    return absent


def _grid_point(trial: str) -> tuple[str, str, str | None, str | None]:
    """(task, measure, threshold, min exit layer) read from a trial id; None where the trial has none."""
    parts = trial.split("__")  # task__measure__t<threshold>__m<layer>__hash (`store.trial_id`)
    task, measure, threshold, layer = parts[:4] if len(parts) == 5 else (parts[0], trial, "t?", "m?")
    threshold, layer = threshold.removeprefix("t"), layer.removeprefix("m")
    return task, measure, None if threshold == "na" else threshold, None if layer == "na" else layer


def absent_row(trial: str, problem: str, width: int) -> list[str]:
    """A task table row for a trial without a result, its grid point read from the trial id."""
    _, measure, threshold, layer = _grid_point(trial)
    return [measure, threshold or MISSING, layer or MISSING, f"**{problem}**", *[MISSING] * (width - 4)]


def build_leaderboard(output_dir: str | Path, tolerance: float = 1.0) -> list[Path]:
    """Write leaderboard.{md,csv,tex}, summary.{csv,tex} and the plots into `output_dir`; return the paths."""
    output_dir = Path(output_dir)
    records, unreadable = scan_records(output_dir)
    if not any(r.get("status") == "ok" for r in records):
        raise ValueError(f"{output_dir} holds no successful trial records; run `mee-bench sweep CONFIG` first")
    manifest = read_manifest(output_dir / MANIFEST) or {}
    absent = absent_trials(output_dir, records, unreadable, manifest)
    measures = manifest.get("config", {}).get("measures")
    name = manifest.get("config", {}).get("name") or output_dir.name
    boards = task_boards(records, measures)
    chosen = summary(boards, tolerance)
    written: list[Path] = []

    markdown = [f"# Leaderboard: {name}", "", *_context(records), ""]
    if absent:
        markdown += [
            f"**{len(absent)} trial(s) of this sweep have no result** and are listed as such in their task's table.",
            "",
        ]
    latex = []
    absent_tasks = {trial.split("__")[0] for trial in absent} - {board.task for board in boards}
    for task in sorted(absent_tasks):  # a task none of whose trials has a readable record
        boards.append(TaskBoard(task, MISSING, [], [], notes=["no readable record: nothing to compare"]))
    for board in boards:
        header, rows = task_table(board)
        rows += [
            absent_row(trial, problem, len(header))
            for trial, problem in absent.items()
            if trial.split("__")[0] == board.task
        ]
        markdown += [
            f"## {board.task} (quality: {board.metric})",
            "",
            tabulate(rows, header, tablefmt="github", disable_numparse=True),
            "",
        ]
        markdown += [f"_{note}_" for note in dict.fromkeys(board.notes)]
        if board.rows:
            plot = output_dir / f"quality_vs_speedup_{board.task}.png"
            plot_quality_vs_speedup(board, plot, tolerance)
            written.append(plot)
            markdown += [f"![quality vs speedup]({plot.name})", ""]
        latex += [
            f"% {board.task} (quality: {board.metric})",
            tabulate(rows, header, tablefmt="latex_booktabs", disable_numparse=True),
            "",
        ]
    header, rows = summary_table(chosen, boards)
    exit_plot = output_dir / "avg_exit_layer.png"
    plot_exit_layers(boards, exit_plot)
    markdown += [
        f"## Summary: the fastest configuration within {tolerance:g} quality point(s) of full",
        "",
        tabulate(rows, header, tablefmt="github", disable_numparse=True),
        "",
        f"![average exit layer per measure]({exit_plot.name})",
        "",
    ]
    files = {
        "leaderboard.md": "\n".join(markdown),
        "leaderboard.tex": "\n".join(latex),
        "summary.tex": tabulate(rows, header, tablefmt="latex_booktabs", disable_numparse=True) + "\n",
    }
    for filename, text in files.items():
        (output_dir / filename).write_text(text)
        written.append(output_dir / filename)
    _write_csv(output_dir / "leaderboard.csv", *_csv_rows(boards, absent))
    _write_csv(output_dir / "summary.csv", header, rows)
    written += [output_dir / "leaderboard.csv", output_dir / "summary.csv", exit_plot]
    return written


def summary_markdown(output_dir: str | Path, tolerance: float = 1.0) -> str:
    """One line of context and the summary table (the fastest configuration of each measure within
    `tolerance` quality points of `full`), rebuilt from the sweep's records."""
    output_dir = Path(output_dir)
    records, _ = scan_records(output_dir)
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise ValueError(f"{output_dir} holds no successful trial records; run `mee-bench sweep CONFIG` first")
    manifest = read_manifest(output_dir / MANIFEST) or {}
    boards = task_boards(records, manifest.get("config", {}).get("measures"))
    header, rows = summary_table(summary(boards, tolerance), boards)
    config, hw = ok[0]["config"], ok[0].get("hardware", {})
    context = (
        f"Sweep `{manifest.get('config', {}).get('name') or output_dir.name}`: "
        f"`{Path(config['model']['pretrained']).name}` ({config['model']['dtype']}, {config['model']['device']}), "
        f"{config.get('limit') or 'all'} examples per task, batch size {config.get('batch_size', 'unknown')}, "
        f"{hw.get('cpu_model')}, {hw.get('torch_threads')} torch thread(s); per task and measure, the fastest "
        f"configuration within {tolerance:g} quality point(s) of `full`."
    )
    return f"{context}\n\n{tabulate(rows, header, tablefmt='github', disable_numparse=True)}"


def block_markdown(output_dir: str | Path, document_dir: str | Path, summary_only: bool = False) -> str:
    """What a document's leaderboard block shows: the whole leaderboard, or with `summary_only` its summary."""
    if summary_only:
        return summary_markdown(output_dir)
    return relocate((Path(output_dir) / "leaderboard.md").read_text(), output_dir, document_dir, heading_shift=2)


def embed_in_markdown(
    document: str | Path, output_dir: str | Path, force: bool = False, summary_only: bool = False
) -> Path:
    """Replace the block between `<!-- leaderboard:start -->` and `<!-- leaderboard:end -->` in
    `document` with the sweep's leaderboard (or, with `summary_only`, its summary table), so a
    README shows generated numbers, never typed ones. A block that already holds something is
    replaced only with `force`."""
    document = Path(document)
    text = document.read_text()
    held = block_content(text, BLOCK)
    if held is None:
        start, end = markers(BLOCK)
        raise ValueError(
            f"{document} has no '{start}' ... '{end}' block to fill; add those two lines where the table goes"
        )
    if held.strip() and not force:
        raise ValueError(f"the leaderboard block of {document} already holds a leaderboard; pass --force to replace it")
    command = f"mee-bench leaderboard {output_dir} --readme {document.name}{' --summary' if summary_only else ''}"
    document.write_text(fill_block(text, BLOCK, block_markdown(output_dir, document.parent, summary_only), command))
    return document


def cli(argv: list[str]) -> int:
    """`mee-bench leaderboard results/<sweep> [--readme README.md [--summary]]`."""
    parser = argparse.ArgumentParser(
        prog="mee-bench leaderboard", description="Rebuild tables and plots from a sweep's records."
    )
    parser.add_argument("output_dir", help="a sweep directory, e.g. results/quickstart")
    parser.add_argument(
        "--tolerance", type=float, default=1.0, help="quality points below full still counted as 'as good' (default 1)"
    )
    parser.add_argument("--readme", help="also write the leaderboard into this markdown file's leaderboard block")
    parser.add_argument("--summary", action="store_true", help="write only the summary table into the --readme block")
    parser.add_argument("--force", action="store_true", help="replace what the --readme block already holds")
    args = parser.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        print(f"mee-bench leaderboard: error: {args.output_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        paths = build_leaderboard(args.output_dir, args.tolerance)
        if args.readme:
            paths.append(embed_in_markdown(args.readme, args.output_dir, args.force, args.summary))
    except (ValueError, SweepError) as err:
        print(f"mee-bench leaderboard: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
