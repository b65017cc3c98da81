"""The early-exit checkpoints researchers have, as tiny checkpoints saved with the same config keys.

LayerSkip's Llamas (`facebook/layerskip-llama3.2-1B` and kin) are plain Llama weights trained
for early exit: tied embeddings as in Llama 3.2 1B and `rope_scaling` of type llama3, written in
the transformers 4.x form the hub files have. FREE's T5s carry their own early-exit keys in the
config, which mee-bench ignores and names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.loading import FREE_CONFIG_KEYS, load_generator
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import ExitPolicy
from tests.engine import test_decoder_only as causal
from tests.engine import test_decoding as seq2seq
from tests.helpers import tiny_model

LAYERS = 8
DRAFT_LAYERS = 2  # LayerSkip drafts with the first 4 of the 1B's 16 layers: a quarter, as here
# facebook/layerskip-llama3.2-1B's config.json (as Llama 3.2 1B's), widths and depth shrunk
LAYERSKIP_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": causal.EOS,
    "head_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.2,
    "intermediate_size": 64,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 32128,  # the offline T5 tokenizer's
}
# What FREE's `update_autoconfig` adds to a shallow-deep T5's config (a subset with its values)
FREE_KEYS = {
    "use_shallow_deep": True,
    "shallow_exit_layer": 1,
    "shallow2deep_conf_type": "softmax",
    "shallow2deep_conf_threshold": 0.9,
    "use_early_exit": False,
    "exit_conf_type": "softmax",
    "exit_conf_threshold": 0.9,
    "exit_min_layer": 1,
    "parallel_gen_token": True,
    "copy_skipped_hidden_states": False,
    "use_adapt_threshold": False,
}
THRESHOLDS = {"saturation": 0.95}  # the other measures: 0.5 of their [0, 1] range


def policy(measure: str, **fields) -> ExitPolicy:
    if MEASURES[measure].takes_threshold:
        fields.setdefault("threshold", THRESHOLDS.get(measure, 0.5))
    return ExitPolicy(measure, min_exit_layer=DRAFT_LAYERS, **fields)


def save_with_hub_config(model, path: Path, config: dict) -> Path:
    """Weights saved by transformers, config.json as the hub has it (not as transformers 5 rewrites it)."""
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def layerskip_dir(tmp_path_factory, t5_tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("layerskip-llama")
    (path / "config.json").write_text(json.dumps(LAYERSKIP_CONFIG))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    save_with_hub_config(model, path, LAYERSKIP_CONFIG)
    ExitHeads(d_model=32).save(path, metadata={"num_layers": LAYERS})  # untrained: every learned measure runs
    t5_tokenizer.save_pretrained(path)  # offline: LayerSkip's Llama 3 tokenizer is not here
    return path


@pytest.fixture(scope="module")
def layerskip(layerskip_dir) -> EarlyExitGenerator:
    return load_generator(layerskip_dir, require_heads=True)


def test_the_layerskip_checkpoint_loads_tied_with_llama3_rope_scaling(layerskip):
    model = layerskip.model
    assert model.dtype == torch.float32  # the hub's torch_dtype=bfloat16 is not what mee-bench was asked for
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.rotary_emb.rope_type == "llama3"
    assert layerskip.num_layers == LAYERS


@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]], ids=["batch1", "batch4"])
def test_full_equals_generate_on_the_layerskip_checkpoint(layerskip, lengths):
    ids, mask = causal.padded_batch(lengths)
    out = layerskip.generate(ids, mask, ExitPolicy("full"), causal.MAX_NEW)
    assert out.tokens == causal.hf_greedy(layerskip.model, ids, mask)
    assert len(set(out.tokens[0])) > 2, "varied tokens make the comparison mean something"


@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]], ids=["batch1", "batch4"])
def test_self_speculation_with_every_measure_that_can_exit_writes_fulls_tokens(layerskip, lengths):
    """LayerSkip's decoding: draft with the first layers, verify with the rest; lossless whatever decides
    how far a draft runs."""
    ids, mask = causal.padded_batch(lengths)
    full = layerskip.generate(ids, mask, ExitPolicy("full"), causal.MAX_NEW)
    drafting = [name for name, cls in MEASURES.items() if cls.can_exit]
    assert {"fixed", "softmax", "saturation", "classifier", "lstm", "last_three_mlp", "monotonic_heuristic"} <= set(
        drafting
    )
    for measure in drafting:
        out = layerskip.generate(ids, mask, policy(measure, decoding="self_speculative", max_draft=4), causal.MAX_NEW)
        assert out.tokens == full.tokens, measure
    fixed = layerskip.generate(ids, mask, policy("fixed", decoding="self_speculative", max_draft=4), causal.MAX_NEW)
    assert fixed.stats.speculation.proposed > 0, "the fixed draft must propose tokens for the check to mean anything"


@pytest.mark.parametrize("kv_strategy", ["copy", "deferred"])
def test_every_measure_exits_early_on_the_layerskip_checkpoint(layerskip, kv_strategy):
    ids, mask = causal.padded_batch([9, 5, 7, 3])
    full = layerskip.generate(ids, mask, ExitPolicy("full"), causal.MAX_NEW)
    for measure in MEASURES:
        out = layerskip.generate(ids, mask, policy(measure, kv_strategy=kv_strategy), causal.MAX_NEW)
        layers = [layer for row in out.exit_layers for layer in row]
        assert [len(row) for row in out.exit_layers] == [len(row) for row in out.tokens], measure
        low = LAYERS if measure == "full" else DRAFT_LAYERS
        assert low <= min(layers) and max(layers) <= LAYERS, measure
        if measure == "fixed":
            assert set(layers) == {DRAFT_LAYERS}
        if measure == "oracle":  # exits where the top-1 never changes again: the full model's tokens
            assert out.tokens == full.tokens


def test_lm_eval_runs_the_layerskip_recipe_model_args(layerskip_dir):
    """The model_args docs/CHECKPOINTS.md gives for LayerSkip's self-speculation, through the adapter."""
    from lm_eval.api.instance import Instance

    from mee_bench.harness.lm_eval_model import MEELM

    args = (
        f"pretrained={layerskip_dir},decoding=self_speculative,measure=fixed,min_exit_layer={DRAFT_LAYERS},max_draft=4"
    )
    speculative = MEELM.create_from_arg_string(args, {"device": "cpu", "batch_size": 2})
    prompts = ["The house is", "one two three four five", "A"]
    requests = [
        Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 8}), i, ("gen", i, 1))
        for i, p in enumerate(prompts)
    ]
    texts = speculative.generate_until(requests, disable_tqdm=True)
    speculative.set_policy(ExitPolicy("full"))
    assert texts == speculative.generate_until(requests, disable_tqdm=True)
    assert any(text.strip() for text in texts)


def test_a_free_t5_checkpoint_loads_runs_and_its_ignored_keys_are_logged(tmp_path, t5_tokenizer, caplog):
    model = tiny_model(seed=2, layers=2, decoder_layers=4, vocab_size=512)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    save_with_hub_config(model, tmp_path, {**config, **FREE_KEYS})
    t5_tokenizer.save_pretrained(tmp_path)
    assert set(FREE_KEYS) <= set(FREE_CONFIG_KEYS)
    with caplog.at_level(logging.WARNING, logger="mee_bench.engine.loading"):
        generator = load_generator(tmp_path)
    [warning] = [record.getMessage() for record in caplog.records if "FREE" in record.getMessage()]
    assert warning.startswith(f"{tmp_path} carries FREE's early-exit config keys, which mee-bench ignores")
    named = warning.split("exit_policy.json): ", 1)[1].split(", ")
    assert sorted(named) == sorted(f"{key}={value!r}" for key, value in FREE_KEYS.items())
    ids, mask = seq2seq.padded_batch([9, 5, 7], vocab=512)
    full = generator.generate(ids, mask, ExitPolicy("full"), seq2seq.MAX_NEW)
    assert full.tokens == seq2seq.hf_greedy(generator.model, ids, mask, lazy_cache=True)
    early = generator.generate(ids, mask, ExitPolicy("softmax", threshold=0.0, min_exit_layer=1), seq2seq.MAX_NEW)
    assert all(layer == 1 for row in early.exit_layers for layer in row)


def test_a_plain_checkpoint_logs_no_ignored_keys(layerskip_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="mee_bench.engine.loading"):
        load_generator(layerskip_dir)
    assert not [record for record in caplog.records if "FREE" in record.getMessage()]
