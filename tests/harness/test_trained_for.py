"""Which tasks a model of ours was trained for, and where a run and its tables say so."""

from __future__ import annotations

import json

from mee_bench.harness.catalogue import TASK_NAMES
from mee_bench.harness.trained_for import untrained_note, untrained_tasks
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.sweep.boards import summary, task_boards
from mee_bench.sweep.leaderboard import summary_table
from tests.helpers import record


def test_the_embedded_default_was_trained_for_translation_and_squad_only():
    assert untrained_tasks(DEFAULT_MODEL_DIR, TASK_NAMES) == ["cnndm_mee", "bigpatent_mee"]
    note = untrained_note(DEFAULT_MODEL_DIR, ["cnndm_mee", "tatoeba_enfr_mee"])
    assert note.startswith("note: the embedded default model was not trained for cnndm_mee (")
    assert "pretrained=" in note and "tatoeba_enfr_mee" not in note.split("(")[0]
    assert untrained_note(DEFAULT_MODEL_DIR, ["wmt15_enfr_mee", "squad_mee"]) is None


def test_a_model_without_our_training_record_is_not_judged_and_others_are_read_from_theirs(tmp_path):
    assert untrained_tasks(tmp_path, TASK_NAMES) == []
    card = {"data": {"sources": [{"name": "squad", "path": "squad/train.jsonl", "task": "squad", "weight": 1.0}]}}
    (tmp_path / "training.json").write_text(json.dumps(card))
    assert untrained_tasks(tmp_path, [*TASK_NAMES, "lambada_openai"]) == [
        "cnndm_mee",
        "wmt15_enfr_mee",
        "bigpatent_mee",
        "tatoeba_enfr_mee",
    ]
    assert f"model {tmp_path} was not trained for" in untrained_note(tmp_path, ["cnndm_mee"])


def test_the_leaderboard_marks_a_task_the_model_was_not_trained_for():
    records = []
    for task in ("cnndm_mee", "tatoeba_enfr_mee"):
        for rec in (record(task, "full", None, None, 20.0, 10.0, 6.0), record(task, "softmax", 0.9, 2, 19.5, 5.0, 3.0)):
            rec["config"]["model"]["pretrained"] = str(DEFAULT_MODEL_DIR)
            records.append(rec)
    boards = {board.task: board for board in task_boards(records)}
    assert boards["cnndm_mee"].untrained and not boards["tatoeba_enfr_mee"].untrained
    assert any("not trained for cnndm_mee" in note for note in boards["cnndm_mee"].notes)
    _, rows = summary_table(summary(list(boards.values())), list(boards.values()))
    assert sorted(row[0] for row in rows) == ["cnndm_mee (model untrained for it)", "tatoeba_enfr_mee"]


def test_a_sweep_of_the_default_on_an_untrained_task_says_so_before_it_runs(capsys):
    from mee_bench.sweep.config import load_config, resolve_model
    from mee_bench.sweep.runner import say_untrained_tasks

    say_untrained_tasks(resolve_model(load_config("configs/quickstart.yaml", ["tasks=[cnndm_mee,tatoeba_enfr_mee]"])))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "not trained for cnndm_mee " in lines[0]
    say_untrained_tasks(resolve_model(load_config("configs/quickstart.yaml", ["tasks=[tatoeba_enfr_mee]"])))
    assert capsys.readouterr().err == ""
