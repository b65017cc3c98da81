"""A sweep accepts a decoder-only `model.pretrained`: the model checks, and trials through the real backend."""

from __future__ import annotations

import pytest

from mee_bench.engine.heads import ExitHeads
from mee_bench.sweep.backend import LMEvalBackend
from mee_bench.sweep.config import ConfigError, check_model, expand_grid, resolve_model, to_config


def sweep_config(model_dir, tmp_path, **overrides):
    values = {
        "name": "decoder-only",
        "model": {"pretrained": str(model_dir)},
        "tasks": ["tatoeba_enfr_mee"],
        "measures": ["fixed"],
        "min_exit_layers": [2],
        "limit": 2,
        "max_gen_toks": 6,
        "output_dir": str(tmp_path / "out"),
        "carbon": {"country_iso_code": "FRA"},
    }
    values.update(overrides)
    return resolve_model(to_config(values))


def test_model_checks_read_a_decoder_only_checkpoints_depth(tiny_llama_dir, tmp_path):
    assert check_model(sweep_config(tiny_llama_dir, tmp_path)) == 4
    with pytest.raises(ConfigError, match="min_exit_layers holds 5 but .* has 4 decoder layers"):
        check_model(sweep_config(tiny_llama_dir, tmp_path, min_exit_layers=[5]))


def test_heads_of_another_model_are_refused_for_a_decoder_only_sweep(tiny_gpt2_dir, tmp_path):
    ExitHeads(d_model=48).save(tmp_path, metadata={"num_layers": 4})
    config = sweep_config(
        tiny_gpt2_dir,
        tmp_path,
        measures=["classifier"],
        thresholds={"classifier": [0.9]},
        model={"pretrained": str(tiny_gpt2_dir), "heads": str(tmp_path)},
    )
    with pytest.raises(ConfigError, match="trained for d_model=48, but the model has d_model=32"):
        check_model(config)


def test_trials_of_a_decoder_only_model_run_through_the_real_backend(tiny_gpt2_dir, tmp_path):
    config = sweep_config(tiny_gpt2_dir, tmp_path)
    backend = LMEvalBackend(config)
    outcomes = {trial.measure: backend.evaluate(trial, trial.policy(config)) for trial in expand_grid(config)}
    assert set(outcomes) == {"full", "fixed"}
    assert "bleu" in outcomes["full"].metrics
    assert outcomes["full"].efficiency["avg_exit_layer"] == 4.0
    assert outcomes["fixed"].efficiency["exit_histogram"] == {"2": outcomes["fixed"].efficiency["tokens"]}
