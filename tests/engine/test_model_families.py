"""Every model type the loader accepts, on tiny configs: `full` equals Hugging Face's greedy
`generate` token for token, and early exits run (T5 v1.0, T5 v1.1 / Flan-T5, mT5); saved checkpoints
of every decoder-only family load (their decoding: `test_decoder_only.py`); a type the loader does
not accept (UMT5: a relative position bias in every layer; Gemma 2: soft-capped attention scores)
is refused by name with the reason."""

from __future__ import annotations

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import ModelLoadError, load_model
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import build_runner, supported_model_types
from tests.helpers import CAUSAL_FAMILIES, MAX_NEW, hf_greedy, padded_batch, tiny_causal_model, tiny_t5_values

TINY = tiny_t5_values(vocab_size=512, layers=2, decoder_layers=4)
FAMILIES = {
    "t5 v1.0 (relu, tied)": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(feed_forward_proj="relu", tie_word_embeddings=True),
    ),
    "t5 v1.1 / flan-t5 (gated-gelu, untied)": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu")),
}


def build(family: str, seed: int = 2):
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**TINY, **extra)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_equals_generate_and_early_exits_run_on_every_accepted_family(family):
    model = build(family)
    assert model.config.model_type in supported_model_types()
    ids, mask = padded_batch([9, 5, 7], vocab=TINY["vocab_size"])
    generator = EarlyExitGenerator(model)
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    assert full.tokens == hf_greedy(model, ids, mask, lazy_cache=True)
    assert max(len(set(row)) for row in full.tokens) > 3, "varied tokens make the comparison mean something"
    early = generator.generate(ids, mask, ExitPolicy("softmax", threshold=0.0, min_exit_layer=1), MAX_NEW)
    assert all(layer == 1 for row in early.exit_layers for layer in row)  # threshold 0 exits at the first chance
    for kv_strategy in ("copy", "deferred"):
        out = generator.generate(
            ids, mask, ExitPolicy("softmax", threshold=0.5, min_exit_layer=2, kv_strategy=kv_strategy), MAX_NEW
        )
        assert [len(row) for row in out.exit_layers] == [len(row) for row in out.tokens]
        assert all(2 <= layer <= 4 for row in out.exit_layers for layer in row)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_checkpoint_of_every_accepted_family_loads(family, tmp_path, t5_tokenizer):
    build(family).save_pretrained(tmp_path)
    t5_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.model_type == build(family).config.model_type


def test_umt5_is_refused_by_name_with_the_supported_types(tmp_path):
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    UMT5ForConditionalGeneration(UMT5Config(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"is a 'umt5' model"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="umt5"):
        EarlyExitGenerator(UMT5ForConditionalGeneration(UMT5Config(**TINY)))


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_a_saved_checkpoint_of_every_decoder_only_family_loads_with_its_runner(family, tmp_path, t5_tokenizer):
    """The loader path (config, safetensors, tokenizer) of every decoder-only family; its decoding is
    held to `generate` and to slow references in `test_decoder_only.py`."""
    tiny_causal_model(family).save_pretrained(tmp_path)
    t5_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.model_type == family
    assert type(build_runner(model)).__name__ != "T5LayerRunner"


def test_gemma2_is_refused_by_name_with_the_reason(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"is a 'gemma2' model, which mee-bench does not run: its attention soft-caps"
    ):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'gemma2' is not supported: its attention soft-caps scores"):
        EarlyExitGenerator(Gemma2ForCausalLM(config))


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"attn_logit_softcapping": 50.0}, "its attention soft-caps scores"),
        ({"use_bidirectional_attention": True}, "its attention is bidirectional"),
    ],
)
def test_a_gemma3_checkpoint_the_runner_cannot_serve_is_refused_with_the_reason(
    override, reason, tmp_path, t5_tokenizer
):
    model = tiny_causal_model("gemma3_text", **override)
    model.save_pretrained(tmp_path)
    t5_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"is a 'gemma3_text' model mee-bench cannot run: {reason}"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=reason):
        EarlyExitGenerator(model)
