"""Which catalogue tasks a model of ours was trained for, so that a score on any other is not read as a result.

A model trained by `mee-bench train` (the embedded default among them) carries `training.json`,
which lists its data sources and the task each was read as. A catalogue task counts as trained
for when some source fed the model inputs of that task's form (the same prompt template: the
WMT15 and Tatoeba tasks share "translate English to French: ..."). A checkpoint without that
record (a hub model) is not judged. Like the catalogue, this module imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from mee_bench.harness.catalogue import SQUAD, TATOEBA_ENFR, TaskSpec, UnknownTaskError, task
from mee_bench.paths import DEFAULT_MODEL_DIR

CARD = "training.json"
# A training source's `task` -> the catalogue entry whose prompt and reference it was read with
# (`mee_bench.train.data.TASKS` is this table).
TRAINING_TASKS: dict[str, TaskSpec] = {"translate_en_fr": TATOEBA_ENFR, "squad": SQUAD}
REAL_CHECKPOINT_HINT = "pass a checkpoint trained for it (e.g. pretrained=google/flan-t5-base)"


def training_sources(pretrained: str | Path) -> list[dict] | None:
    """The data sources a model of ours was trained on, or None when it carries no training record."""
    card = Path(str(pretrained)).expanduser() / CARD
    if not card.is_file():
        return None
    try:
        return list(json.loads(card.read_text())["data"]["sources"])
    except (ValueError, KeyError, TypeError):
        return None


def untrained_tasks(pretrained: str | Path, tasks: Iterable[str]) -> list[str]:
    """The catalogue tasks among `tasks` whose input form the model never saw in training (none for a model
    without a training record, or for a task outside the catalogue)."""
    sources = training_sources(pretrained)
    if sources is None:
        return []
    seen = {TRAINING_TASKS[s["task"]].prompt_template for s in sources if s.get("task") in TRAINING_TASKS}
    untrained = []
    for name in dict.fromkeys(tasks):
        try:
            spec = task(name)
        except UnknownTaskError:
            continue
        if spec.prompt_template not in seen:
            untrained.append(name)
    return untrained


def untrained_note(pretrained: str | Path, tasks: Iterable[str]) -> str | None:
    """One line to print before a run when the model was not trained for some of its tasks, else None."""
    untrained = untrained_tasks(pretrained, tasks)
    if not untrained:
        return None
    is_default = Path(str(pretrained)).expanduser().resolve() == DEFAULT_MODEL_DIR.resolve()
    model = "the embedded default model" if is_default else f"model {pretrained}"
    names = ", ".join(sorted({s["name"] for s in training_sources(pretrained) or [] if s.get("name")}))
    return (
        f"note: {model} was not trained for {', '.join(untrained)} (its training data: {names}); its scores there "
        f"measure speed, not quality: {REAL_CHECKPOINT_HINT}"
    )
