"""`mee-bench train` and `train-heads` on a decoder-only model: a tiny Llama built from a config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.train.config import ConfigError, load_config
from mee_bench.train.heads import train_heads
from mee_bench.train.loop import train
from tests.helpers import TINY_TRAINING, tiny_train_config

TINY_LLAMA = {"family": "llama", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64, "num_decoder_layers": 3}


@pytest.fixture(scope="module")
def trained_llama(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny Llama trained 20 steps with weighted CE, evaluated at the end."""
    output = tmp_path_factory.mktemp("runs") / "tiny-llama"
    torch.manual_seed(0)
    train(tiny_train_config(tiny_corpus, output, model=TINY_LLAMA, eval_every_steps=20))
    return output


def test_weighted_ce_trains_a_decoder_only_model_and_the_engine_loads_it(trained_llama):
    records = [json.loads(line) for line in (trained_llama / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    evaluation = [r for r in records if r["kind"] == "eval"][-1]
    assert len(evaluation["val_ce"]) == 3 and all(ce > 0 for ce in evaluation["val_ce"])
    assert json.loads((trained_llama / "training.json").read_text())["status"] == "complete"
    generator = load_generator(trained_llama)
    assert generator.model.config.model_type == "llama" and generator.num_layers == 3
    texts, out = generator.generate_text(["English: I am here.\nFrench:"], ExitPolicy("full"), 8)
    assert out.tokens[0] and all(layer == 3 for layer in out.exit_layers[0])


def test_exit_heads_train_on_a_decoder_only_model_and_serve_learned_measures(trained_llama, tiny_corpus):
    path, report = train_heads(
        trained_llama,
        data=[(str(tiny_corpus / "train.jsonl"), "translate_en_fr")],
        validation=(str(tiny_corpus / "validation.jsonl"), "translate_en_fr"),
        steps=30,
        batch_tokens=600,
        validation_examples=40,
        seed=0,
        log=lambda _line: None,
    )
    assert path == trained_llama / "exit_heads.safetensors" and len(report["classifier"]) == 2
    generator = load_generator(trained_llama)
    assert generator.heads is not None and generator.heads.metadata["num_layers"] == 3
    for measure in ("classifier", "lstm", "last_three_mlp"):
        _, out = generator.generate_text(
            ["English: I am here.\nFrench:"], ExitPolicy(measure, threshold=0.5, min_exit_layer=1), 6
        )
        assert all(1 <= layer <= 3 for layer in out.exit_layers[0])


@pytest.mark.parametrize(
    "model, message",
    [
        ({**TINY_LLAMA, "d_kv": 8}, "model.d_kv is a T5-only option, but model.family=llama is decoder-only"),
        ({**TINY_LLAMA, "num_layers": 1}, "model.num_layers is a T5-only option"),
        (
            {**TINY_LLAMA, "family": "bart"},
            "unknown model.family 'bart'; use t5 or a decoder-only one: .*gpt2, .*llama",
        ),
        ({**TINY_LLAMA, "num_kv_heads": 3}, "model.num_kv_heads=3 must divide model.num_heads=4"),
        ({"num_kv_heads": 2}, "model.num_kv_heads is a decoder-only option"),
    ],
)
def test_decoder_only_config_errors_name_the_fix(tmp_path, model, message):
    from omegaconf import OmegaConf

    values = copy.deepcopy(TINY_TRAINING)
    values["model"] = model
    values["output_dir"] = str(tmp_path / "run")
    values["data"]["sources"] = [{"path": "x.jsonl", "task": "translate_en_fr"}]
    OmegaConf.save(OmegaConf.create(values), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "config.yaml")


def test_the_quick_decoder_preset_is_a_valid_decoder_only_config():
    cfg = load_config("quick-decoder")
    assert cfg.model.family == "llama" and cfg.model.num_kv_heads == 2
