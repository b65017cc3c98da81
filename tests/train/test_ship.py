"""Shipping a finished run as the embedded default: only complete, only with a clear lead, history kept."""

from __future__ import annotations

import json

from mee_bench.study.model_report import history_curves, training_history
from mee_bench.train.ship import MODEL_FILES, STALE_FILES, cli


def fake_run(directory, bleu, status="complete", run_name=None, init=None, init_run=None, tokens=1000):
    directory.mkdir(parents=True)
    for name in MODEL_FILES:
        (directory / name).write_text(f"{directory.name}:{name}")
    card = {
        "status": status,
        "objective": {"name": "weighted_ce"},
        "steps": 10,
        "tokens_seen": tokens,
        "wall_time_minutes": 1.0,
        "init": init,
        "init_run": init_run,
        "config": {"output_dir": f"/elsewhere/{run_name or directory.name}"},
        "evaluations": [{"step": 10, "tokens": tokens, "minutes": 1.0, "bleu": bleu, "val_ce": [3.0, 2.0]}],
    }
    (directory / "training.json").write_text(json.dumps(card))
    return directory


def test_a_run_ships_only_complete_and_with_the_lead_and_the_old_fitted_files_go(tmp_path, capsys):
    shipped = fake_run(tmp_path / "default", bleu=7.9, run_name="default-weighted-ce")
    for name in STALE_FILES:
        (shipped / name).write_text("fitted to the old weights")
    unfinished = fake_run(tmp_path / "campaign-1", bleu=12.0, status="in progress")
    assert cli([str(unfinished), "--to", str(shipped)]) == 2
    assert "still training" in capsys.readouterr().err
    close = fake_run(tmp_path / "campaign-2", bleu=9.0)
    assert cli([str(close), "--to", str(shipped)]) == 2
    assert "BLEU 9.00 against the shipped 7.90: less than the 2-point lead" in capsys.readouterr().err
    leading = fake_run(tmp_path / "campaign-3", bleu=10.5)
    assert cli([str(leading), "--to", str(shipped), "--dry-run"]) == 0
    assert (shipped / "model.safetensors").read_text() == "default:model.safetensors"
    assert cli([str(leading), "--to", str(shipped)]) == 0
    assert (shipped / "model.safetensors").read_text() == "campaign-3:model.safetensors"
    assert json.loads((shipped / "training" / "campaign-3.json").read_text())["evaluations"][0]["bleu"] == 10.5
    assert not any((shipped / name).exists() for name in STALE_FILES)


def test_the_history_of_a_model_rewritten_each_session_links_its_runs_through_init_run(tmp_path):
    model = tmp_path / "default"
    first = fake_run(tmp_path / "base", bleu=5.0, tokens=4000)
    model.mkdir()
    (model / "training").mkdir()
    (model / "training" / "base.json").write_text((first / "training.json").read_text())
    second = fake_run(tmp_path / "campaign-1", bleu=9.0, init=str(model), init_run="base", tokens=3000)
    (model / "training" / "campaign-1.json").write_text((second / "training.json").read_text())
    (model / "training.json").write_text((second / "training.json").read_text())
    history = training_history(model)
    assert [stage["run"] for stage in history["stages"]] == ["base", "campaign-1"] and not history["others"]
    curves = history_curves(history)
    assert curves["campaign-1"][0]["tokens"] == 4000 + 3000  # the session starts where the shipped run ended


def test_a_fine_tune_goes_on_to_the_next_epoch_of_its_inits_data_order(trained_tiny, tiny_corpus, tmp_path):
    from mee_bench.train.loop import train
    from tests.helpers import tiny_train_config

    base = json.loads((trained_tiny / "training.json").read_text())
    output = tmp_path / "next"
    train(tiny_train_config(tiny_corpus, output, **{"model.init": str(trained_tiny), "budget.steps": 1}))
    card = json.loads((output / "training.json").read_text())
    assert card["init_run"] == trained_tiny.name and card["epoch"] == base["epoch"] + 1
