"""The task catalogue against what lm-eval reads (the YAMLs) and builds, and against training data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mee_bench.harness.catalogue import (
    GROUP_NAME,
    GROUP_TASK_NAMES,
    TASK_NAMES,
    TASKS,
    TASKS_DIR,
    TaskSpec,
    UnknownTaskError,
    task,
)
from mee_bench.harness.data import local_split_path, read_jsonl
from mee_bench.harness.lm_eval_model import task_manager
from mee_bench.paths import data_root
from mee_bench.train import data as train_data

needs_data = pytest.mark.skipif(data_root() is None, reason="needs the local data slices")


@pytest.fixture(scope="module")
def manager():
    return task_manager(include_defaults=False)


@pytest.fixture(scope="module")
def built(manager):
    """Every task as lm-eval builds it from the package's YAMLs (loads the local data)."""
    return manager.load(list(TASK_NAMES))["tasks"]


def first_record(spec: TaskSpec) -> dict:
    return next(read_jsonl(local_split_path(spec.dataset, spec.split)))


@pytest.mark.parametrize("spec", TASKS, ids=TASK_NAMES)
def test_each_yaml_agrees_with_its_catalogue_entry(manager, spec):
    entry = manager.task_index[spec.name]
    config = entry.cfg
    assert entry.yaml_path == TASKS_DIR / f"{spec.name}.yaml"
    assert config["task"] == spec.name
    assert config["dataset_kwargs"] == {"data_name": spec.dataset, "data_split": spec.split}
    assert config["validation_split"] == spec.split
    generation = config["generation_kwargs"]
    assert generation["until"] == list(spec.until)
    assert generation.get("max_gen_toks") == spec.max_gen_toks
    metrics = tuple(item["metric"] for item in config["metric_list"])
    assert metrics == spec.metrics and spec.primary_metric in metrics


def test_every_catalogue_task_has_a_yaml_and_every_yaml_task_is_in_the_catalogue(manager):
    ours = {
        name
        for name, entry in manager.task_index.items()
        if entry.yaml_path is not None and entry.yaml_path.parent == TASKS_DIR
    }
    assert ours == {*TASK_NAMES, GROUP_NAME}
    assert GROUP_NAME in manager.all_groups and set(TASK_NAMES) <= set(manager.all_subtasks)


def test_the_group_yaml_lists_exactly_the_catalogues_group_tasks(manager):
    assert manager.task_index[GROUP_NAME].cfg["task"] == list(GROUP_TASK_NAMES)
    assert GROUP_TASK_NAMES and set(GROUP_TASK_NAMES) < set(TASK_NAMES)


@needs_data
@pytest.mark.parametrize("spec", TASKS, ids=TASK_NAMES)
def test_lm_eval_builds_the_catalogues_prompt_and_reference_for_the_first_local_record(built, spec):
    record, doc = first_record(spec), built[spec.name].validation_docs()[0]
    assert built[spec.name].doc_to_text(doc) == spec.prompt(record)
    assert built[spec.name].doc_to_target(doc) == spec.target(record)
    assert spec.prompt(record) != spec.prompt_template and spec.target(record).strip()


def test_prompts_keep_t5s_task_prefixes_byte_for_byte():
    # The T5 formats every result and the default model's training depend on: a change here is a new benchmark.
    record = {
        "question": "Who?",
        "context": "Me.",
        "article": "A b.",
        "description": "C d.",
        "translation": {"en": "Hi.", "fr": "Salut."},
        "answers": {"text": ["Me", "me"]},
    }
    prompts = {spec.name: spec.prompt(record) for spec in TASKS}
    assert prompts == {
        "squad_mee": "question: Who? context: Me.",
        "cnndm_mee": "summarize: A b.",
        "wmt15_enfr_mee": "translate English to French: Hi.",
        "bigpatent_mee": "summarize: C d.",
        "tatoeba_enfr_mee": "translate English to French: Hi.",
    }
    assert task("squad_mee").references(record) == ["Me", "me"] and task("squad_mee").target(record) == "Me"
    assert task("wmt15_enfr_mee").references(record) == ["Salut."]


@needs_data
@pytest.mark.parametrize("kind", sorted(train_data.TASKS))
def test_training_reads_a_record_into_the_prompt_and_reference_the_task_evaluates(built, kind):
    spec = train_data.TASKS[kind]
    [example] = train_data.read_examples(f"{spec.dataset}/{spec.split}.jsonl", kind, limit=1)
    doc = built[spec.name].validation_docs()[0]
    assert (example.source, example.target) == (built[spec.name].doc_to_text(doc), built[spec.name].doc_to_target(doc))


@needs_data
@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("tatoeba_fra_eng/train.jsonl", "translate_en_fr"),
        ("wmt_news_enfr_2008_2013/train.jsonl", "translate_en_fr"),
        ("squad/train.jsonl", "squad"),
    ],
)
def test_training_corpora_get_the_task_prompt(path, kind):
    spec = train_data.TASKS[kind]
    examples = train_data.read_examples(path, kind, limit=3)
    records = [row for row, _ in zip(read_jsonl(data_root() / path), range(3))]
    assert [(e.source, e.target) for e in examples] == [(spec.prompt(r), spec.target(r)) for r in records]


def test_training_refuses_a_squad_record_without_answers(tmp_path):
    path = tmp_path / "squad.jsonl"
    path.write_text(json.dumps({"question": "q", "context": "c", "answers": {"text": [], "answer_start": []}}) + "\n")
    with pytest.raises(train_data.DataError, match=r"squad.jsonl:1: .*answers.text is empty"):
        train_data.read_examples(path, "squad")


@pytest.mark.parametrize(
    ("typo", "closest"),
    [("sqaud_mee", "squad_mee"), ("tatoeba_enfr", "tatoeba_enfr_mee"), ("cnn_dailymail", "cnndm_mee")],
)
def test_an_unknown_task_names_the_closest_valid_one(typo, closest):
    with pytest.raises(UnknownTaskError, match=f"unknown task '{typo}'; did you mean '{closest}'") as caught:
        task(typo)
    assert all(name in str(caught.value) for name in TASK_NAMES)


def test_a_primary_metric_outside_the_metrics_is_refused():
    with pytest.raises(ValueError, match="primary metric 'f1' is not one of"):
        TaskSpec("x_mee", "x", "validation", "{x}", "y", metrics=("bleu",), primary_metric="f1")


@pytest.mark.slow
def test_the_catalogue_imports_without_torch_transformers_or_lm_eval():
    heavy = ("torch", "transformers", "lm_eval", "datasets")
    code = f"import sys, mee_bench.harness.catalogue; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
