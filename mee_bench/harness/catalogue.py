"""The task catalogue: each `*_mee` task's data, prompts (T5's, and a decoder-only model's), reference
and metrics, written once.

lm-eval reads the YAMLs in `tasks/`; their glue (`tasks/utils.py`) takes prompts and fields
from here, as do training data, the monotonicity study, the model report, the leaderboard,
the demo and the benchmarks, and tests hold every YAML to its entry. This module imports
neither torch, transformers nor lm-eval, so the leaderboard can read it cheaply.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass
from functools import reduce
from operator import getitem
from pathlib import Path
from typing import Any, Iterable, Mapping

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUP_NAME = "mee"
_FORMATTER = string.Formatter()


class UnknownTaskError(ValueError):
    """A task name that is not in the catalogue."""


class RecordError(TypeError):
    """A record that lacks a field its task's prompt or metric reads (a TypeError, as `format_map` raises)."""


class TaskDataError(ValueError):
    """A task's data that cannot be evaluated: no records, or a record named by file and line that lacks a field."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: which records it reads, how a record becomes (prompt, reference), how it is scored."""

    name: str
    dataset: str  # folder under the data root: `<root>/<dataset>/<split>.jsonl`
    split: str
    prompt_template: str  # `str.format_map` over a record: `{translation[en]}` reads record["translation"]["en"]
    reference_field: str  # dotted path to the reference, or to the list of references
    metrics: tuple[str, ...]
    primary_metric: str  # the quality a leaderboard ranks by (the paper's choice where it has one)
    max_gen_toks: int | None = None
    until: tuple[str, ...] = ()
    in_group: bool = True  # one of the paper's tasks, listed in group `mee`
    causal_template: str = ""  # the prompt for a decoder-only model: the record's text, then a cue to answer
    causal_until: tuple[str, ...] = ("\n",)  # where a decoder-only model's answer ends (it has no EOS habit)

    def __post_init__(self) -> None:
        if self.primary_metric not in self.metrics:
            raise ValueError(f"{self.name}: primary metric {self.primary_metric!r} is not one of {self.metrics}")

    @property
    def prompt_fields(self) -> tuple[str, ...]:
        """The fields the prompt reads, as the template writes them (`translation[en]`)."""
        return tuple(name for _, name, _, _ in _FORMATTER.parse(self.prompt_template) if name)

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The model input for one record: T5's task prefix around the record's fields, each a
        non-empty string (a missing source must not become the prompt `... None`)."""
        for name in self.prompt_fields:
            try:
                value, _ = _FORMATTER.get_field(name, (), record)
            except (KeyError, IndexError, TypeError):
                raise RecordError(f"{name} is missing") from None
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"{name} is {value!r}, not a non-empty string")
        return self.prompt_template.format_map(record)

    def causal_prompt(self, record: Mapping[str, Any]) -> str:
        """The model input for one record when the model is decoder-only: T5's task prefixes mean
        nothing to a causal LM, which continues text; the record then an "Answer:"-style cue does."""
        return (self.causal_template or self.prompt_template).format_map(record)

    def references(self, record: Mapping[str, Any]) -> list[str]:
        """Every reference of a record (SQuAD lists several annotators' answers), each a string."""
        try:
            value = reduce(getitem, self.reference_field.split("."), record)
        except (KeyError, IndexError, TypeError):
            raise RecordError(f"{self.reference_field} is missing") from None
        references = list(value) if isinstance(value, list) else [value]
        if not all(isinstance(reference, str) for reference in references):
            raise RecordError(f"{self.reference_field} is {value!r}, not a string or a list of strings")
        return references

    def check_records(self, located: Iterable[tuple[str, Mapping[str, Any]]], source: str) -> None:
        """Refuse, before any compute, data with no records or a record (named by its location,
        e.g. `file:line`) that lacks what the prompt or the metric reads."""
        count = 0
        for where, record in located:
            count += 1
            try:
                self.prompt(record)
                self.target(record)
            except RecordError as err:
                raise TaskDataError(f"{where}: not a {self.name} record ({err}); fix or remove that record") from None
        if not count:
            raise TaskDataError(
                f"{source} holds no records, so task {self.name} has nothing to evaluate; "
                "point the data root at a non-empty split"
            )

    def target(self, record: Mapping[str, Any]) -> str:
        """The one reference a model is trained and teacher-forced on: the first."""
        references = self.references(record)
        if not references:
            raise RecordError(f"{self.reference_field} is empty")
        return references[0]


SQUAD = TaskSpec(
    name="squad_mee",
    dataset="squad",
    split="validation",
    prompt_template="question: {question} context: {context}",
    reference_field="answers.text",
    metrics=("exact_match", "f1"),
    primary_metric="f1",
    max_gen_toks=32,
    causal_template="{context}\nQuestion: {question}\nAnswer:",
)
CNNDM = TaskSpec(
    name="cnndm_mee",
    dataset="cnn_dailymail",
    split="validation",
    prompt_template="summarize: {article}",
    reference_field="highlights",
    metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"),
    primary_metric="rougeL",
    max_gen_toks=128,
    causal_template="{article}\nTL;DR:",
    causal_until=("\n\n",),
)
WMT15_ENFR = TaskSpec(
    name="wmt15_enfr_mee",
    dataset="wmt15",
    split="validation",
    prompt_template="translate English to French: {translation[en]}",
    reference_field="translation.fr",
    metrics=("bleu", "chrf"),
    primary_metric="bleu",
    max_gen_toks=128,
    causal_template="English: {translation[en]}\nFrench:",
)
BIGPATENT = TaskSpec(
    name="bigpatent_mee",
    dataset="big_patent",
    split="validation",
    prompt_template="summarize: {description}",
    reference_field="abstract",
    metrics=("rouge1", "rouge2", "rougeL"),
    primary_metric="rougeL",
    max_gen_toks=256,
    causal_template="{description}\nAbstract:",
    causal_until=("\n\n",),
)
TATOEBA_ENFR = TaskSpec(
    name="tatoeba_enfr_mee",
    dataset="tatoeba_fra_eng",
    split="validation",
    prompt_template="translate English to French: {translation[en]}",
    reference_field="translation.fr",
    metrics=("bleu", "chrf", "bleu_multiref"),
    primary_metric="bleu",
    max_gen_toks=64,
    in_group=False,
    causal_template="English: {translation[en]}\nFrench:",
)

TASKS: tuple[TaskSpec, ...] = (SQUAD, CNNDM, WMT15_ENFR, BIGPATENT, TATOEBA_ENFR)
TASK_NAMES: tuple[str, ...] = tuple(spec.name for spec in TASKS)
GROUP_TASK_NAMES: tuple[str, ...] = tuple(spec.name for spec in TASKS if spec.in_group)
_BY_NAME = {spec.name: spec for spec in TASKS}


def tasks_reading(dataset: str, split: str) -> list[TaskSpec]:
    """The catalogue tasks that read `<dataset>/<split>`."""
    return [spec for spec in TASKS if spec.dataset == dataset and spec.split == split]


def task(name: str) -> TaskSpec:
    """The catalogue entry of `name`; an unknown name raises naming the closest task and all of them."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    [closest] = difflib.get_close_matches(name, TASK_NAMES, n=1, cutoff=0.0)
    raise UnknownTaskError(f"unknown task {name!r}; did you mean {closest!r}? The tasks are {', '.join(TASK_NAMES)}")
