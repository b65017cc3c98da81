"""A leaderboard's figures: quality against speedup per task (with the Pareto front), exit layers per measure."""

from __future__ import annotations

from pathlib import Path

from mee_bench.sweep.boards import TaskBoard, pareto_front


def plot_quality_vs_speedup(board: TaskBoard, path: Path, tolerance: float) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    shown = [r for r in board.rows if r.speedup is not None and r.quality is not None and not r.analysis_only]
    points = [(r.speedup.ratio, r.quality) for r in shown]
    for measure in dict.fromkeys(r.measure for r in shown):
        mine = [r for r in shown if r.measure == measure]
        x = [r.speedup.ratio for r in mine]
        spread = [[r.speedup.ratio - r.speedup.low for r in mine], [r.speedup.high - r.speedup.ratio for r in mine]]
        axes.errorbar(
            x,
            [r.quality for r in mine],
            xerr=spread,
            fmt="*" if measure == "full" else "o",
            markersize=9 if measure == "full" else 5,
            capsize=3,
            label=measure,
        )
    if points:
        axes.step(*zip(*pareto_front(points)), where="pre", color="black", linewidth=1, label="Pareto front")
    full = next((r for r in board.rows if r.measure == "full" and r.quality is not None), None)
    if full is not None:
        axes.axhline(full.quality - tolerance, color="grey", linestyle=":", label=f"full - {tolerance:g} point(s)")
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("speedup vs full (paired, ms/token ratio, 95% interval)")
    axes.set_ylabel(board.metric)
    axes.set_title(f"{board.task}: quality vs speedup")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_exit_layers(boards: list[TaskBoard], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.4, 3.2 * len(boards)), 4.4))
    all_axes = figure.subplots(1, len(boards), squeeze=False)[0]
    for axes, board in zip(all_axes, boards):
        measures = list(dict.fromkeys(r.measure for r in board.rows))
        for index, measure in enumerate(measures):
            layers = [r.avg_exit_layer for r in board.rows if r.measure == measure and r.avg_exit_layer is not None]
            axes.scatter([index] * len(layers), layers, s=25, alpha=0.7)
            if layers:
                axes.hlines(sum(layers) / len(layers), index - 0.3, index + 0.3, color="black")
        depth = max((r.num_layers or 0 for r in board.rows), default=0)
        if depth:
            axes.axhline(depth, color="grey", linestyle=":", label=f"{depth} decoder layers")
            axes.legend(fontsize="small")
        axes.set_xticks(range(len(measures)), measures, rotation=45, ha="right")
        axes.set_ylabel("average exit layer")
        axes.set_title(board.task)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
