"""Per-example losses in [0, 1] that calibration bounds.

`textual`: how far the early-exit output is from the full model's output for the same input
(1 - ROUGE-L F, or 1 - sentence BLEU / chrF over 100). `risk`: how much quality the early-exit
output loses against the reference relative to the full model's, clipped at 0; the clipping
counts no credit when early exit happens to do better, so the bound is conservative.
"""

from __future__ import annotations

from typing import Sequence

from mee_bench.calibrate.config import ConfigError

CLIPPING_NOTE = (
    "risk losses are max(0, quality(full) - quality(early exit)): an early exit that beats the full model "
    "earns no credit, so the bound is conservative"
)


def similarity(metric: str, prediction: str, references: Sequence[str]) -> float:
    """How close `prediction` is to the best of `references`, in [0, 1] (1 = identical)."""
    import sacrebleu

    from mee_bench.harness.tasks.utils import rouge

    if not references:
        raise ValueError("similarity needs at least one reference")
    if metric == "rougeL":
        if not prediction.strip() and not any(r.strip() for r in references):
            return 1.0
        return max(rouge(reference, prediction, ("rougeL",))["rougeL"] for reference in references) / 100.0
    if metric == "bleu":
        if prediction in references:
            return 1.0
        return sacrebleu.sentence_bleu(prediction, list(references)).score / 100.0
    if metric == "chrf":
        if prediction in references:
            return 1.0
        return sacrebleu.sentence_chrf(prediction, list(references)).score / 100.0
    raise ValueError(f"unknown metric {metric!r}")


def check_references(kind: str, references: Sequence[Sequence[str]], task: str) -> None:
    """The risk kind scores against references: every example must have one."""
    missing = sum(not refs for refs in references)
    if kind == "risk" and missing:
        raise ConfigError(
            f"consistency.kind=risk needs a reference for every example, but {missing} of {len(references)} "
            f"examples of {task} have none; use consistency.kind=textual (distance to the full model's output)"
        )


def losses(
    kind: str,
    metric: str,
    early: Sequence[str],
    full: Sequence[str],
    references: Sequence[Sequence[str]] = (),
) -> list[float]:
    """One loss in [0, 1] per example, early-exit output vs full output (and references for `risk`)."""
    if len(early) != len(full):
        raise ValueError(f"{len(early)} early-exit outputs but {len(full)} full outputs")
    if kind == "textual":
        return [1.0 - similarity(metric, e, [f]) for e, f in zip(early, full)]
    if kind == "risk":
        if len(references) != len(full) or any(not refs for refs in references):
            raise ConfigError("consistency.kind=risk needs references for every example; use consistency.kind=textual")
        return [
            max(0.0, similarity(metric, f, refs) - similarity(metric, e, refs))
            for e, f, refs in zip(early, full, references)
        ]
    raise ConfigError(f"consistency.kind={kind!r} is unknown; use textual or risk")
