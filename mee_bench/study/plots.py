"""The monotonicity study's written report: figures, JSON, CSV and a markdown summary.

Several models are overlaid like the paper's figures: Figure 1 `fraction-no-change.png`,
Figure 2 `mean-top1-curves.png` (one panel per model), Figure 3
`examples-monotonicity.png` (top-3 tokens per layer for the same tokens, one column per
model) and `exit-signals.png` (the signals the MEE measures read). Only matplotlib's
object-oriented API is used, so no global backend state is touched; constrained layout and
wrapped suptitles keep every label inside the figure, however narrow one model makes it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from tabulate import tabulate

from mee_bench.formatting import percent
from mee_bench.study.results import ModelAnalysis

MODEL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
TOKEN_COLORS = (
    "tab:red",
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)
HEADLINE_LAYERS = (2, 4)  # the paper's headline: 75% keep their top-1 after layer 2, 90% after layer 4
MIN_LABELED_PROB = 0.05  # fainter tokens keep their line but get no label


def _color(index: int) -> str:
    return MODEL_COLORS[index % len(MODEL_COLORS)]


def _series(analysis: ModelAnalysis, key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in analysis.layers if row.get(key) is not None]
    return [row["layer"] for row in rows], [math.nan if row[key] is None else row[key] for row in rows]


def _layer_axis(ax, analyses: Sequence[ModelAnalysis]) -> None:
    depth = max(a.num_layers for a in analyses)
    ax.set_xlabel("decoder layer")
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlim(0.7, depth + 0.3)
    ax.grid(alpha=0.3)


def _label(text: str) -> str:
    """Token strings as plain text (matplotlib would read `$...$` as math), with
    SentencePiece's word-boundary mark shown as a visible space: a lone `▁` is a thin line."""
    return text.replace("$", r"\$").replace("\u2581", "\u2423")


def fraction_no_change_figure(analyses: Sequence[ModelAnalysis]) -> Figure:
    """Figure 1: share of tokens whose top-1 never changes after layer i; beside it, top-1 = final."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for index, analysis in enumerate(analyses):
        for ax, key in ((left, "no_change"), (right, "matches_final")):
            ax.plot(
                *_series(analysis, key),
                marker="o",
                color=_color(index),
                label=f"{analysis.label} ({analysis.tokens} tokens)",
            )
    left.set_title("top-1 does not change after layer i")
    right.set_title("top-1 at layer i = final top-1")
    left.set_ylabel("fraction of tokens")
    for ax in (left, right):
        _layer_axis(ax, analyses)
        ax.set_ylim(0, 1.03)
    left.legend(loc="lower right")
    fig.suptitle(f"Fraction of top-1 predictions that do not change ({analyses[0].mode.replace('_', '-')})")
    return fig


def confidence_curves_figure(analyses: Sequence[ModelAnalysis]) -> Figure:
    """Figure 2: mean and standard deviation of the probability of the eventual prediction."""
    fig = Figure(figsize=(4.2 * len(analyses) + 0.6, 4), layout="constrained")
    axes = fig.subplots(1, len(analyses), sharey=True, squeeze=False)[0]
    for index, (ax, analysis) in enumerate(zip(axes, analyses)):
        layers, mean = _series(analysis, "confidence_mean")
        _, std = _series(analysis, "confidence_std")
        color = _color(index)
        ax.plot(layers, mean, marker="o", color=color, label="mean")
        ax.fill_between(
            layers,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=color,
            alpha=0.2,
            label="± 1 std",
        )
        ax.set_title(analysis.label)
        _layer_axis(ax, analyses)
        ax.set_ylim(0, 1.03)
    axes[0].set_ylabel("probability of the final prediction")
    axes[0].legend(loc="upper left")
    fig.suptitle("Confidence in the eventual prediction per layer", wrap=True)
    return fig


def _example_panel(ax, example: dict, num_layers: int) -> None:
    """Each token that is ever in a layer's top 3: its probability at every layer, solid
    markers where it is in the top 3; the final prediction drawn thick."""
    layers = list(range(1, num_layers + 1))
    in_top3 = [{entry["id"] for entry in top} for top in example["top3"]]
    final_id = example["top3"][-1][0]["id"]
    peak = {trace["id"]: max(trace["probs"]) for trace in example["traces"]}
    traces = sorted(example["traces"], key=lambda trace: (trace["id"] != final_id, -peak[trace["id"]]))
    for rank, trace in enumerate(traces):
        color = TOKEN_COLORS[rank] if rank < len(TOKEN_COLORS) else "0.6"
        final = trace["id"] == final_id
        ax.plot(layers, trace["probs"], color=color, lw=2.4 if final else 1.0, alpha=0.95 if final else 0.7)
        top_layers = [layer for layer in layers if trace["id"] in in_top3[layer - 1]]
        ax.scatter(top_layers, [trace["probs"][layer - 1] for layer in top_layers], color=color, s=18, zorder=3)
        best = max(range(num_layers), key=lambda i: trace["probs"][i])
        if rank < len(TOKEN_COLORS) and peak[trace["id"]] >= MIN_LABELED_PROB:
            ax.annotate(
                _label(trace["token"]),
                (best + 1, trace["probs"][best]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=8,
                color=color,
                fontweight="bold" if final else "normal",
            )
    ax.set_xticks(layers)
    ax.set_xlim(0.7, num_layers + 0.6)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)


def examples_figure(analyses: Sequence[ModelAnalysis]) -> Figure:
    """Figure 3: the top-3 predictions per layer of the same tokens, one column per model."""
    rows = max((len(a.examples) for a in analyses), default=0)
    fig = Figure(figsize=(4.4 * len(analyses) + 0.4, 3.2 * max(rows, 1) + 0.4), layout="constrained")
    axes = fig.subplots(max(rows, 1), len(analyses), squeeze=False)
    for column, analysis in enumerate(analyses):
        for row in range(max(rows, 1)):
            ax = axes[row][column]
            if row >= len(analysis.examples):
                ax.set_axis_off()
                continue
            example = analysis.examples[row]
            _example_panel(ax, example, analysis.num_layers)
            context = _label(example["prefix"].replace("\n", " ")[-28:])
            token = _label(example["token"])
            ax.set_title(f"{analysis.label}, position {example['position']}\n…{context} → '{token}'", fontsize=9)
            if column == 0:
                ax.set_ylabel("probability")
            if row == rows - 1:
                ax.set_xlabel("decoder layer")
    fig.suptitle(
        "Top-3 predictions per layer (thick: the final prediction; dots: in that layer's top 3; "
        "\u2423: word-initial space)",
        wrap=True,
    )
    return fig


def exit_signals_figure(analyses: Sequence[ModelAnalysis]) -> Figure:
    """What MEE's measures read: hidden-state saturation and rising top-1 probabilities."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    saturation, rising, kept = fig.subplots(1, 3)
    for index, analysis in enumerate(analyses):
        color = _color(index)
        layers, mean = _series(analysis, "saturation_mean")
        _, std = _series(analysis, "saturation_std")
        saturation.plot(layers, mean, marker="o", color=color, label=analysis.label)
        saturation.fill_between(
            layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.15
        )
        rising.plot(*_series(analysis, "rising"), marker="o", color=color, label=f"{analysis.label}: rising")
        rising.plot(
            *_series(analysis, "rising_confident"),
            marker="s",
            ls="--",
            color=color,
            label=f"{analysis.label}: rising, all ≥ {analysis.heuristic['threshold']}",
        )
        kept.plot(
            *_series(analysis, "rising_confident_kept"),
            marker="s",
            ls="--",
            color=color,
            label=f"{analysis.label}: rising, all ≥ {analysis.heuristic['threshold']}",
        )
        kept.plot(
            *_series(analysis, "rising_kept"), marker="o", color=color, alpha=0.6, label=f"{analysis.label}: rising"
        )
    saturation.set_title("saturation: cos(h_i, h_(i-1))")
    saturation.set_ylabel("cosine (mean ± std)")
    rising.set_title("top-1 prob. rises over layers i-2, i-1, i")
    rising.set_ylabel("fraction of tokens")
    kept.set_title("of those: top-1 does not change after i")
    kept.set_ylabel("fraction of firing tokens")
    for ax in (saturation, rising, kept):
        _layer_axis(ax, analyses)
    for ax in (rising, kept):
        ax.set_ylim(-0.02, 1.03)
        ax.legend(fontsize=7, loc="best")
    saturation.legend(fontsize=8, loc="best")
    fig.suptitle("Exit signals")
    return fig


def write_figures(analyses: Sequence[ModelAnalysis], out_dir: str | Path) -> list[Path]:
    """Render every figure as PNG into `out_dir`; return the paths."""
    out = Path(out_dir)
    figures = {
        "fraction-no-change.png": fraction_no_change_figure(analyses),
        "mean-top1-curves.png": confidence_curves_figure(analyses),
        "examples-monotonicity.png": examples_figure(analyses),
        "exit-signals.png": exit_signals_figure(analyses),
    }
    paths = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def summary_markdown(analyses: Sequence[ModelAnalysis], config: dict) -> str:
    """The headline numbers: how early each model settles on its final top-1."""

    def at(analysis: ModelAnalysis, layer: int, key: str) -> float | None:
        return analysis.layers[layer - 1][key] if layer <= analysis.num_layers else None

    reference = "reference" if config["mode"] == "teacher_forced" else "generated (check)"
    headers = [
        "model",
        "layers",
        "tokens",
        *[f"no change after L{i}" for i in HEADLINE_LAYERS],
        *[f"p(final) at L{i}" for i in HEADLINE_LAYERS],
        "heuristic fires",
        "heuristic exit = final",
        "heuristic mean exit layer",
        f"final top-1 = {reference}",
    ]
    rows = [
        [
            a.label,
            a.num_layers,
            a.tokens,
            *[percent(at(a, i, "no_change")) for i in HEADLINE_LAYERS],
            *[percent(at(a, i, "confidence_mean")) for i in HEADLINE_LAYERS],
            percent(a.heuristic["fires"]),
            percent(a.heuristic["exit_equals_final"]),
            f"{a.heuristic['mean_exit_layer']:.2f}",
            percent(a.final_top1_accuracy),
        ]
        for a in analyses
    ]
    depth = max(a.num_layers for a in analyses)
    per_layer = [[i, *[percent(at(a, i, "no_change")) for a in analyses]] for i in range(1, depth + 1)]
    source = config.get("task") or config.get("inputs")
    truncated = max(a.truncated_inputs for a in analyses)
    decoder_inputs = "references" if config["mode"] == "teacher_forced" else "each model's own greedy output"
    lines = [
        "# Monotonicity analysis",
        "",
        f"Inputs: `{source}`, {analyses[0].sequences} sequences ({truncated} inputs cut at the input-length limit), "
        f"mode `{config['mode']}` ({decoder_inputs}, teacher-forced to read every layer).",
        "",
        "No change after Li: share of tokens whose top-1 at layer i is the top-1 of every later layer "
        "(Figure 1). p(final): mean probability of the final layer's prediction (Figure 2). "
        f"Heuristic: MEE's rule (last three top-1 probabilities rise, all >= {config['threshold']}) from layer "
        f"{config['min_exit_layer']}; how often it fires before the last layer and how often its exit top-1 "
        "is the final top-1.",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        "## Fraction no-change per layer",
        "",
        tabulate(per_layer, headers=["layer", *[a.label for a in analyses]], tablefmt="github"),
        "",
        "Figures: `fraction-no-change.png` (Figure 1), `mean-top1-curves.png` (Figure 2), "
        "`examples-monotonicity.png` (Figure 3), `exit-signals.png` (saturation and rising top-1).",
        "Numbers: `monotonicity.csv`, `monotonicity.json` (with the example tokens).",
        "",
    ]
    return "\n".join(lines)


def write_report(analyses: Sequence[ModelAnalysis], out_dir: str | Path, config: dict) -> list[Path]:
    """Write JSON, CSV, the figures and the markdown summary into `out_dir`; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = out / "monotonicity.json", out / "monotonicity.csv", out / "README.md"
    payload = {"config": config, "models": [a.as_dict() for a in analyses]}
    json_path.write_text(json.dumps(_json_safe(payload), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    columns = list(dict.fromkeys(key for a in analyses for row in a.layers for key in row))
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "model", "mode", *columns])
        writer.writeheader()
        for a in analyses:
            for row in a.layers:
                writer.writerow({"label": a.label, "model": a.model, "mode": a.mode, **row})
    md_path.write_text(summary_markdown(analyses, config), encoding="utf-8")
    return [json_path, csv_path, md_path, *write_figures(analyses, out)]
