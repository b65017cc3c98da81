"""Calibration and test examples: the task's own prompts and references, drawn as disjoint sets.

Prompts and targets come from the lm-eval task (its YAML's `doc_to_text` / `doc_to_target`),
so calibration sees exactly what evaluation sees. An example is one distinct prompt with all
of its references: Tatoeba lists every valid translation as its own pair, and counting a
source twice (or once in each split) would break the independence the guarantee rests on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable

from mee_bench.calibrate.config import CalibrationConfig, ConfigError, SplitConfig
from mee_bench.sweep.config import closest


@dataclass(frozen=True)
class Example:
    prompt: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class TaskData:
    """What calibration needs from a task: its examples per split and its generation length."""

    name: str
    splits: dict[str, list[Example]]
    max_new_tokens: int


def group_examples(pairs: Iterable[tuple[str, Any]]) -> list[Example]:
    """(prompt, target) pairs -> one Example per distinct prompt, first-seen order, references
    deduplicated; a missing or blank target adds no reference."""
    references: dict[str, list[str]] = {}
    for prompt, target in pairs:
        targets = target if isinstance(target, list) else [target]
        refs = references.setdefault(prompt, [])
        refs += [str(t) for t in targets if t is not None and str(t).strip() and str(t) not in refs]
    return [Example(prompt, tuple(refs)) for prompt, refs in references.items()]


def load_task(config: CalibrationConfig) -> TaskData:
    """Load `config.task` through lm-eval's TaskManager and group the docs of both splits."""
    from mee_bench.harness.catalogue import TASK_NAMES
    from mee_bench.harness.data import load_split
    from mee_bench.harness.lm_eval_model import task_manager
    from mee_bench.sweep.backend import needs_builtin_tasks

    manager = task_manager(include_defaults=needs_builtin_tasks([config.task]))
    if config.task not in manager.all_tasks:
        raise ConfigError(f"unknown task {config.task!r}; did you mean {closest(config.task, sorted(TASK_NAMES))!r}?")
    task = manager.load([config.task])["tasks"][config.task]
    splits = {}
    for split in dict.fromkeys((config.calibration.split, config.test.split)):
        if split in task.dataset:
            docs = task.dataset[split]
        elif (task.config.dataset_kwargs or {}).get("data_name"):
            docs = load_split(task.config.dataset_kwargs["data_name"], split)
        else:
            raise ConfigError(f"task {config.task} has no split {split!r}; it has {', '.join(task.dataset)}")
        splits[split] = group_examples((task.doc_to_text(doc), task.doc_to_target(doc)) for doc in docs)
    max_new_tokens = config.max_new_tokens or int((task.config.generation_kwargs or {}).get("max_gen_toks", 64))
    return TaskData(config.task, splits, max_new_tokens)


def draw_splits(
    data: TaskData, calibration: SplitConfig, test: SplitConfig, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded draws of `calibration.size` and `test.size` distinct prompts that share none.

    From one data split the two come from one shuffle (first the calibration, then the test
    prompts); from two, test prompts also seen in the calibration split are left out.
    """
    rng = random.Random(seed)
    pool = list(data.splits[calibration.split])
    rng.shuffle(pool)
    if len(pool) < calibration.size:
        raise ConfigError(
            f"calibration.size={calibration.size} but {data.name}/{calibration.split} has {len(pool)} distinct "
            "prompts; lower it"
        )
    chosen = pool[: calibration.size]
    taken = {example.prompt for example in chosen}
    if test.split == calibration.split:
        rest = pool[calibration.size :]
    else:
        rest = [e for e in data.splits[test.split] if e.prompt not in taken]
        rng.shuffle(rest)
    if len(rest) < test.size:
        raise ConfigError(
            f"test.size={test.size} but only {len(rest)} prompts of {data.name}/{test.split} are left once the "
            f"{calibration.size} calibration prompts are set aside (the two must not overlap); lower test.size or "
            "calibration.size"
        )
    tested = rest[: test.size]
    check_disjoint(chosen, tested)
    return chosen, tested


def check_disjoint(calibration: list[Example], test: list[Example]) -> None:
    shared = {e.prompt for e in calibration} & {e.prompt for e in test}
    if shared:
        raise ConfigError(
            f"the calibration and test sets share {len(shared)} prompts (e.g. {next(iter(shared))!r}); "
            "the test risk is only an honest check on unseen prompts: draw disjoint sets"
        )
