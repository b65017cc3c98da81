"""`mee-bench model-report`: training lineage, curves on one time axis, and the report end to end."""

from __future__ import annotations

import json
import shutil

import pytest

from mee_bench.study.model_report import cli, history_curves, training_history


def _record(run: str, init: str | None, minutes: float, steps: int, evals: list[tuple[int, float, float]]) -> dict:
    return {
        "status": "complete",
        "objective": {"name": "final"},
        "steps": steps,
        "tokens_seen": steps * 100,
        "wall_time_minutes": minutes,
        "init": init,
        "config": {"output_dir": f"runs/{run}"},
        "evaluations": [
            {"kind": "eval", "step": s, "minutes": m, "val_ce": [5.0, ce], "bleu": 1.0} for s, m, ce in evals
        ],
    }


@pytest.fixture
def model_with_history(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "training").mkdir()
    base = _record("base", None, 60.0, 1000, [(500, 30.0, 4.0), (1000, 60.0, 3.5)])
    extend = _record("extend", "/anywhere/runs/base", 40.0, 800, [(800, 40.0, 3.0)])
    scratch = _record("scratch", None, 18.0, 300, [(250, 15.0, 4.5)])
    sibling = _record("sibling", "/work/runs/extend", 5.0, 100, [(100, 5.0, 3.1)])
    own = _record("finetune", "/work/runs/extend", 10.0, 200, [(200, 10.0, 2.9)])
    for name, record in {
        "base": base,
        "extend": extend,
        "scratch": scratch,
        "sibling": sibling,
        "finetune": own,
    }.items():
        (model / "training" / f"{name}.json").write_text(json.dumps(record))
    (model / "training.json").write_text(json.dumps(own))
    return model


def test_history_follows_init_links_oldest_first(model_with_history):
    history = training_history(model_with_history)
    assert [s["run"] for s in history["stages"]] == ["base", "extend", "finetune"]
    assert [o["run"] for o in history["others"]] == ["scratch", "sibling"]


def test_curves_continue_where_the_parent_ended(model_with_history):
    curves = history_curves(training_history(model_with_history))
    assert [(p["minutes"], p["step"]) for p in curves["base"]] == [(30.0, 500), (60.0, 1000)]
    assert [(p["minutes"], p["step"]) for p in curves["extend"]] == [(100.0, 1800)]
    assert [(p["minutes"], p["step"]) for p in curves["finetune"]] == [(110.0, 2000)]
    assert [(p["minutes"], p["val_ce_last"]) for p in curves["scratch"]] == [(15.0, 4.5)]
    assert [(p["minutes"], p["step"]) for p in curves["sibling"]] == [(105.0, 1900)]  # a fine-tune of `extend` too


def test_a_model_without_training_records_has_no_history(tiny_model_dir):
    assert training_history(tiny_model_dir) == {"stages": [], "others": []}


def test_report_end_to_end_on_a_tiny_model(model_with_history, tmp_path, capsys):
    out = tmp_path / "report" / "model.md"
    code = cli(
        [
            str(model_with_history),
            "--out",
            str(out),
            "--tasks",
            "tatoeba_enfr_mee",
            "--limit",
            "2",
            "--agreement-limit",
            "3",
            "--batch-size",
            "2",
            "--threads",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["quality"]["tatoeba_enfr_mee"]["examples"] == 2
    assert set(data["quality"]["tatoeba_enfr_mee"]["metrics"]) >= {"bleu", "chrf"}
    layers = data["agreement"]["layers"]
    assert data["agreement"]["sequences"] == 3
    assert layers[-1]["matches_final"] == 1.0 and layers[-1]["no_change"] == 1.0
    assert all(r["no_change"] <= r["matches_final"] + 1e-12 for r in layers)
    text = out.read_text()
    assert "`tatoeba_enfr_mee`" in text and "| base " in text and "scratch" in text
    assert "Training wall time of the runs listed: 133.0 minutes." in text
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope_mee"], "unknown task"),
        (["--limit", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_are_named(tiny_model_dir, tmp_path, capsys, args, message):
    assert cli([str(tiny_model_dir), "--out", str(tmp_path / "r.md"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_missing_model_directory_is_named(tmp_path, capsys):
    assert cli([str(tmp_path / "absent"), "--out", str(tmp_path / "r.md")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_an_existing_report_is_replaced_only_with_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.md"
    out.write_text("an earlier report\n")
    assert cli([str(tiny_model_dir), "--out", str(out)]) == 2
    assert f"{out} already exist(s); pass --force" in capsys.readouterr().err
    assert out.read_text() == "an earlier report\n"
