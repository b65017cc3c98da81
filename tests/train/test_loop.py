"""The trainer end to end on a tiny model: the loss falls, resume equals an uninterrupted run, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mee_bench.train.loop as training
from mee_bench.train.checkpoint import RunError
from mee_bench.train.config import ConfigError, load_config
from mee_bench.train.data import DataError
from mee_bench.train.loop import train
from tests.helpers import tiny_train_config


def train_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "train"]


def train_losses(output: Path) -> list[float]:
    return [record["loss"] for record in train_records(output)]


def test_twenty_steps_lower_the_loss_and_write_a_model_card(trained_tiny):
    losses = train_losses(trained_tiny)
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    card = json.loads((trained_tiny / "training.json").read_text())
    assert card["status"] == "complete" and card["steps"] == 20 and card["objective"]["name"] == "weighted_ce"
    assert card["seed"] == 0 and card["git_commit"] and card["wall_time_minutes"] > 0
    assert "BigPatent" in card["data"]["note"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained_tiny))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.decode(tokenizer("Ça alors, où ?").input_ids, skip_special_tokens=True) == "Ça alors, où ?"


def _interrupt_at(step: int):
    original = training.learning_rate

    def learning_rate(cfg, current: int) -> float:
        if current == step:
            raise KeyboardInterrupt
        return original(cfg, current)

    return learning_rate


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_corpus, tmp_path, monkeypatch):
    """Sampled shallow-layer positions included: a resumed step draws the positions the straight run drew."""
    settings = {"budget.steps": 8, "data.batch_tokens": 300, "objective.shallow_token_fraction": 0.5}
    straight = tmp_path / "straight"
    train(tiny_train_config(tiny_corpus, straight, **settings))
    interrupted = tmp_path / "interrupted"
    config = tiny_train_config(tiny_corpus, interrupted, **settings)
    with monkeypatch.context() as patch:
        patch.setattr(training, "learning_rate", _interrupt_at(5))
        with pytest.raises(KeyboardInterrupt):
            train(config)
    assert json.loads((interrupted / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
    train(config)
    for name in ("model.safetensors", "optimizer.safetensors"):
        expected, got = load_file(straight / "checkpoint" / name), load_file(interrupted / "checkpoint" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=f"{name}:{key}")
    assert train_losses(interrupted) == pytest.approx(train_losses(straight))


def test_output_dir_of_a_different_run_is_refused_and_untouched(trained_tiny, tiny_corpus):
    before = (trained_tiny / "run_config.yaml").read_text()
    with pytest.raises(RunError, match="different run .*optim.lr"):
        train(tiny_train_config(tiny_corpus, trained_tiny, **{"optim.lr": 0.5}))
    assert (trained_tiny / "run_config.yaml").read_text() == before


def test_config_errors(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*default"):
        load_config("nope")
    with pytest.raises(ConfigError, match="closest valid key is 'optim.lr'"):
        load_config("quick", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown objective 'calm'"):
        load_config("quick", ["objective.name=calm"])
    with pytest.raises(ConfigError, match="budget.steps must be positive"):
        load_config("quick", ["budget.steps=0"])
    with pytest.raises(ConfigError, match="budget.minutes must be positive"):
        load_config("quick", ["budget.minutes=0", "budget.steps=null"])
    for preset in ("default", "quick", "default-weighted-ce", "default-final", "default-free"):
        assert load_config(preset).budget.steps > 0


def test_missing_and_malformed_data_name_file_and_line(tiny_corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"translation": {"en": "a", "fr": "b"}}\n{"translation": {"en": "c"}}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*translation\.fr is missing"):
        train(tiny_train_config(tiny_corpus, tmp_path / "run1", **{"data.sources.0.path": str(bad)}))
    bad.write_text('{"translation": {"en": "a", "fr": "b"}}\n\n{"translation": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        train(tiny_train_config(tiny_corpus, tmp_path / "run2", **{"data.sources.0.path": str(bad)}))
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        train(
            tiny_train_config(
                tiny_corpus, tmp_path / "run3", **{"data.sources.0.path": str(tmp_path / "missing.jsonl")}
            )
        )


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert training.cli(["quick", "budget.steps=0"]) == 2
    assert "budget.steps must be positive" in capsys.readouterr().err


def test_fine_tune_from_an_unfinished_base_is_refused(trained_tiny, tiny_corpus, tmp_path):
    unfinished = tmp_path / "base"
    unfinished.mkdir()
    (unfinished / "training.json").write_text('{"status": "in progress"}')
    with pytest.raises(RunError, match="still training"):
        train(tiny_train_config(tiny_corpus, tmp_path / "ft", **{"model.init": str(unfinished)}))
    assert not (tmp_path / "ft").exists()


def test_fine_tune_starts_from_the_base_weights(trained_tiny, tiny_corpus, tmp_path):
    output = tmp_path / "ft"
    train(
        tiny_train_config(
            tiny_corpus,
            output,
            **{
                "model.init": str(trained_tiny),
                "budget.steps": 2,
                "objective.name": "weighted_ce_kd",
                "objective.kd_exit_layer": 1,
                "objective.kd_mapping": "closest",
            },
        )
    )
    first_ce = train_records(output)[0]["ce3"]
    base_ce = [record["ce3"] for record in train_records(trained_tiny)]
    assert first_ce < base_ce[0] - 0.5 and abs(first_ce - base_ce[-1]) < 0.5
    assert json.loads((output / "training.json").read_text())["init"] == str(trained_tiny)


def test_sigterm_stops_training_after_the_step_with_its_checkpoint_saved(tiny_corpus, tmp_path):
    import os
    import signal

    config = tiny_train_config(
        tiny_corpus, tmp_path / "run", **{"budget.steps": 8, "data.batch_tokens": 300, "checkpoint_minutes": 60.0}
    )
    steps: list[int] = []

    def sigterm_at_step_3() -> bool:  # what the loop asks before each step; the signal arrives during step 3
        steps.append(len(steps))
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return asked()

    before = signal.getsignal(signal.SIGTERM)  # another library of the session (Ray) may have set its own
    with training.stop_on_signals() as asked:
        with pytest.raises(training.TrainingInterrupted, match="stopped at step 3; checkpoint saved in .*resume"):
            train(config, sigterm_at_step_3)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert len(train_losses(tmp_path / "run")) == 3


def test_auto_precision_takes_the_probes_choice_and_each_session_records_it(tiny_corpus, tmp_path, monkeypatch):
    from mee_bench.train import precision

    rates = {torch.float32: 50.0, torch.bfloat16: 40.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, *args: rates[dtype])
    output = tmp_path / "auto"
    train(tiny_train_config(tiny_corpus, output, **{"precision": "auto", "budget.steps": 2}))
    rates[torch.bfloat16] = 120.0  # a later session on a machine with bf16 matrix units
    train(tiny_train_config(tiny_corpus, output, **{"precision": "auto", "budget.steps": 3}))
    sessions = json.loads((output / "training.json").read_text())["sessions"]
    assert [(s["step"], s["precision"]) for s in sessions] == [(0, "fp32"), (2, "bf16")]
    assert "bf16 40.0 against fp32 50.0 GFLOP/s" in sessions[0]["reason"] and sessions[1]["bf16_gflops"] == 120.0
    assert len(train_losses(output)) == 3


def test_a_compiled_run_keeps_its_state_dict_names_and_trains_as_the_eager_one(tiny_corpus, tmp_path, monkeypatch):
    """Compiled in place (dynamo traces the real graph; the `eager` backend skips the minutes of code
    generation): the checkpoint has the eager run's tensor names and the losses agree."""
    from torch import nn

    real_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: real_compile(self, backend="eager", **kw))
    settings = {"budget.steps": 3, "eval_every_steps": 3}
    train(tiny_train_config(tiny_corpus, tmp_path / "eager", **settings))
    train(tiny_train_config(tiny_corpus, tmp_path / "compiled", compile=True, **settings))
    eager, compiled = (load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4)
