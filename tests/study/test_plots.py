"""The figures: every title, label, legend entry and token annotation is drawn inside the figure; no pyplot."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from mee_bench.study.analysis import ModelAnalysis
from mee_bench.study.model_report import curves_figure
from mee_bench.study.plots import (
    confidence_curves_figure,
    examples_figure,
    exit_signals_figure,
    fraction_no_change_figure,
)

LAYER_KEYS = (
    "no_change",
    "matches_final",
    "confidence_mean",
    "confidence_std",
    "saturation_mean",
    "saturation_std",
    "rising",
    "rising_confident",
    "rising_kept",
    "rising_confident_kept",
)
TOKENS = ("▁the", "▁chat", "$x$", "▁maison", "s", "▁à", "▁Lorsqu'il", "é")


def _example(rng: random.Random, num_layers: int, position: int) -> dict:
    ids = rng.sample(range(len(TOKENS)), 5)
    probs = {i: [rng.random() for _ in range(num_layers)] for i in ids}
    top3 = [
        [
            {"token": TOKENS[i], "id": i, "prob": probs[i][layer]}
            for i in sorted(ids, key=lambda i: -probs[i][layer])[:3]
        ]
        for layer in range(num_layers)
    ]
    return {
        "position": position,
        "prefix": "Le chat est assis sur le tapis depuis ce matin,\net",
        "token": TOKENS[ids[0]],
        "top3": top3,
        "traces": [{"token": TOKENS[i], "id": i, "probs": probs[i]} for i in ids],
    }


def synthetic_analysis(label: str, num_layers: int, examples: int, seed: int) -> ModelAnalysis:
    """A ModelAnalysis with random but well-formed numbers, as the driver would hand to the plots."""
    rng = random.Random(seed)
    layers = [{"layer": layer, **{key: rng.random() for key in LAYER_KEYS}} for layer in range(1, num_layers + 1)]
    layers[0]["rising"] = layers[0]["rising_confident"] = None  # the rule needs three layers
    return ModelAnalysis(
        label=label,
        model=f"models/{label}",
        mode="teacher_forced",
        num_layers=num_layers,
        sequences=5,
        tokens=120,
        final_top1_accuracy=0.5,
        truncated_inputs=0,
        layers=layers,
        heuristic={"threshold": 0.9, "fires": 0.3, "exit_equals_final": 0.8, "mean_exit_layer": 4.2},
        examples=[_example(rng, num_layers, position) for position in range(examples)],
    )


def _undrawn_tick_labels(figure: Figure) -> set[Text]:
    """Tick labels matplotlib keeps but does not draw: those of ticks outside the view limits."""
    undrawn = set()
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(1.0, high - low)
            drawn = {
                tick
                for locs, ticks in (
                    (axis.get_majorticklocs(), axis.get_major_ticks),
                    (axis.get_minorticklocs(), axis.get_minor_ticks),
                )
                for tick, loc in zip(ticks(len(locs)), locs)
                if low - slack <= loc <= high + slack
            }
            undrawn |= {
                label
                for tick in axis.majorTicks + axis.minorTicks
                if tick not in drawn
                for label in (tick.label1, tick.label2)
            }
    return undrawn


def clipped_texts(figure: Figure) -> list[str]:
    """The drawn, non-empty text artists whose extent leaves the figure (1 px of rounding allowed)."""
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    bounds = figure.bbox.padded(1)
    undrawn = _undrawn_tick_labels(figure)
    clipped = []
    for text in figure.findobj(Text):
        if text in undrawn or not text.get_visible() or not text.get_text().strip():
            continue
        extent = text.get_window_extent(renderer)
        if not (bounds.contains(*extent.p0) and bounds.contains(*extent.p1)):
            clipped.append(text.get_text())
    return clipped


STUDY_FIGURES = (fraction_no_change_figure, confidence_curves_figure, examples_figure, exit_signals_figure)


@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("make_figure", STUDY_FIGURES, ids=lambda f: f.__name__)
def test_study_figures_draw_every_text_inside_the_figure(make_figure, models):
    analyses = [
        synthetic_analysis(f"model-{index}", 4 + 2 * index, examples=3 - index, seed=index) for index in range(models)
    ]
    assert clipped_texts(make_figure(analyses)) == []


def test_training_curves_figure_draws_every_text_inside_the_figure():
    curves = {
        name: [
            {
                "minutes": 10.0 * step + offset,
                "tokens": 400_000 * step + 10_000 * offset,
                "bleu": 5.0 + step,
                "val_ce_last": 3.0 - 0.1 * step,
            }
            for step in range(4)
        ]
        for offset, name in ((0, "default-base"), (40, "default-weighted-ce"))
    }
    assert clipped_texts(curves_figure(curves)) == []


def test_the_check_catches_a_clipped_title():
    figure = Figure(figsize=(2, 2), layout="constrained")  # room for the tick labels, not for the title
    figure.subplots().set_title("a title far too long to fit across a figure two inches wide")
    assert clipped_texts(figure) == ["a title far too long to fit across a figure two inches wide"]


def _imports_pyplot(source: Path) -> bool:
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(alias.name == "matplotlib.pyplot" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (
            node.module == "matplotlib.pyplot"
            or (node.module == "matplotlib" and any(a.name == "pyplot" for a in node.names))
        ):
            return True
    return False


def test_no_module_imports_pyplot():
    """pyplot keeps global figure state and picks a backend; the package and benchmarks build `Figure`s directly."""
    repo = Path(__file__).resolve().parents[2]
    sources = [*(repo / "mee_bench").rglob("*.py"), *(repo / "benchmarks").rglob("*.py")]
    assert len(sources) > 20
    assert [str(path.relative_to(repo)) for path in sources if _imports_pyplot(path)] == []
