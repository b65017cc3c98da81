"""Loading checkpoints and the engine's bad-input messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import HEADS_FILE, ExitHeads
from mee_bench.engine.loading import (
    ModelLoadError,
    check_checkpoint_path,
    load_generator,
    load_model,
    resolve_device,
)
from mee_bench.engine.policy import ExitPolicy
from tests.helpers import TOKENIZER_DIR


def test_local_checkpoint_loads_from_safetensors_in_both_dtypes(tiny_model_dir):
    assert (tiny_model_dir / "model.safetensors").is_file()
    model, tokenizer = load_model(tiny_model_dir)
    assert model.config.num_layers == 2 and model.config.num_decoder_layers == 4
    assert tokenizer("translate English to French: The house is wonderful.").input_ids == [
        13959,
        1566,
        12,
        2379,
        10,
        37,
        629,
        19,
        1627,
        5,
        1,
    ]
    model16, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model16.lm_head.weight.dtype == torch.bfloat16 and not model16.training


def test_engine_handles_unequal_depths_from_a_saved_checkpoint(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    texts, out = EarlyExitGenerator(model, tokenizer).generate_text(
        ["summarize: a b c", "question: who? context: me"], ExitPolicy("softmax", threshold=0.5, min_exit_layer=2), 6
    )
    assert len(texts) == 2 and all(2 <= layer <= 4 for row in out.exit_layers for layer in row)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)


def test_non_t5_checkpoint_is_refused(tmp_path):
    from transformers import BartConfig

    BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError,
        match=r"'bart' model, which mee-bench has no layer runner for; supported: "
        r"encoder-decoder mt5, t5; decoder-only gemma3_text, gpt2, granite, llama, mistral, olmo2, phi3, qwen2, qwen3, "
        r"smollm3",
    ):
        load_model(tmp_path)


def test_encoder_only_checkpoint_is_refused_as_such(tmp_path):
    from transformers import BertConfig

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match="encoder-only 'bert' model, which cannot generate text; use an encoder-decoder"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_only_checkpoint_loads_and_says_which_kind(request, family, caplog):
    directory = request.getfixturevalue(f"tiny_{family}_dir")
    with caplog.at_level(logging.INFO, logger="mee_bench.engine.loading"):
        generator = load_generator(directory, dtype="bfloat16")
    assert f"a decoder-only {family} model" in caplog.text
    assert not generator.runner.is_encoder_decoder and generator.runner.dtype == torch.bfloat16
    assert generator.model.config._attn_implementation == "sdpa"
    texts, out = generator.generate_text(
        ["The house is", "A"], ExitPolicy("softmax", threshold=0.01, min_exit_layer=1), 5
    )
    assert len(texts) == 2 and all(1 <= layer <= 4 for row in out.exit_layers for layer in row)


def test_a_decoder_only_checkpoint_without_safetensors_is_refused_with_the_fix(tmp_path, t5_tokenizer):
    from tests.helpers import tiny_causal_model

    model = tiny_causal_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 saves safetensors only
    t5_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match="mee-bench loads safetensors only: .*re-save it with model.save_pretrained"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "heads, metadata, message",
    [
        (ExitHeads(d_model=48), {}, "trained for d_model=48, but the model has d_model=32"),
        (ExitHeads(d_model=32), {"num_layers": 6}, "trained for 6 decoder layers, but the model has 4"),
    ],
)
def test_heads_of_another_model_are_refused_for_a_decoder_only_model(
    tmp_path, tiny_llama_dir, heads, metadata, message
):
    heads.save(tmp_path, metadata=metadata)
    with pytest.raises(ModelLoadError, match=message):
        load_generator(tiny_llama_dir, heads=tmp_path, require_heads=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dtype": "float16"}, "dtype='float16' is not supported"), ({"device": "tpu"}, "not supported; use cpu or cuda")],
)
def test_bad_dtype_or_device(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_model_dir, **kwargs)


def test_empty_input_is_refused(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    generator = EarlyExitGenerator(model, tokenizer)
    with pytest.raises(ValueError, match="empty input"):
        generator.generate_text([], ExitPolicy("full"))
    with pytest.raises(ValueError, match="empty input"):
        generator.generate_text(["  "], ExitPolicy("full"))
    with pytest.raises(ValueError, match="empty input"):
        generator.generate(torch.zeros(1, 0, dtype=torch.long), None, ExitPolicy("full"))


def test_too_long_input_is_truncated_with_a_warning(tiny_model_dir, caplog):
    model, tokenizer = load_model(tiny_model_dir)
    generator = EarlyExitGenerator(model, tokenizer)
    with caplog.at_level(logging.WARNING, logger="mee_bench.engine.decoding"):
        ids, _ = generator.tokenize(["word " * 50, "short"], max_input_length=16)
    assert ids.shape[1] == 16
    assert "1 of 2 prompts exceed 16 tokens and are truncated" in caplog.text


def test_learned_measure_without_heads_names_the_command(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="mee-bench train-heads"):
        EarlyExitGenerator(model, tokenizer).generate_text(["summarize: x"], ExitPolicy("lstm", min_exit_layer=2))


def test_shared_tokenizer_is_offline():
    assert (TOKENIZER_DIR / "spiece.model").is_file()


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """The tiny checkpoint in a directory of its own, so heads saved beside it stay in this test."""
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_load_generator_finds_the_heads_beside_the_model(model_copy):
    assert load_generator(model_copy).heads is None
    ExitHeads(d_model=32).save(model_copy, metadata={"num_layers": 4})
    generator = load_generator(model_copy, require_heads=True)
    assert generator.heads_path == model_copy / HEADS_FILE and generator.heads.d_model == 32
    _, out = generator.generate_text(["summarize: a b c"], ExitPolicy("lstm", threshold=0.5, min_exit_layer=2), 4)
    assert all(2 <= layer <= 4 for layer in out.exit_layers[0])


@pytest.mark.parametrize(
    "heads, metadata, message",
    [
        (ExitHeads(d_model=48), {}, "trained for d_model=48, but the model has d_model=32"),
        (ExitHeads(d_model=32), {"num_layers": 6}, "trained for 6 decoder layers, but the model has 4"),
    ],
)
def test_heads_of_another_model_are_refused_with_the_fix(model_copy, heads, metadata, message):
    heads.save(model_copy, metadata=metadata)
    generator = load_generator(model_copy)  # heads are read when a policy first needs them
    with pytest.raises(ModelLoadError, match=message) as error:
        generator.heads
    assert "mee-bench train-heads" in str(error.value)


def test_required_heads_that_do_not_exist_name_the_command(model_copy):
    with pytest.raises(ModelLoadError, match="no exit heads beside .*mee-bench train-heads"):
        load_generator(model_copy, require_heads=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour where CUDA is missing")
def test_cuda_where_there_is_none_is_an_error_or_a_fallback(caplog):
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available; use device=cpu"):
        resolve_device("cuda")
    with caplog.at_level(logging.WARNING, logger="mee_bench.engine.loading"):
        assert resolve_device("cuda:0", cpu_fallback=True) == torch.device("cpu")
    assert "running on the CPU" in caplog.text


@pytest.mark.parametrize("spec", ["./no-such-dir", "/a/b/c", "~/missing/model/dir"])
def test_local_paths_that_are_not_checkpoints_are_refused_before_loading(spec):
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_checkpoint_path(spec)


def test_hub_ids_pass_the_path_check():
    assert check_checkpoint_path("google/flan-t5-base") is None


def cut_short(path: Path) -> None:
    """Keep the first half of a file, as a download or save killed midway leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_half_written_weights_name_the_file_and_the_fix(model_copy):
    cut_short(model_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is damaged or incomplete .*re-download or re-save"):
        load_generator(model_copy)


def test_a_damaged_config_names_the_directory_and_the_fix(model_copy):
    cut_short(model_copy / "config.json")
    with pytest.raises(ModelLoadError, match="cannot load a config from .*re-download or re-save"):
        load_generator(model_copy)


def test_a_damaged_tokenizer_names_the_directory_and_the_fix(model_copy):
    for name in ("tokenizer.json", "spiece.model"):
        if (model_copy / name).exists():
            cut_short(model_copy / name)
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer of .*re-download or re-save the tokenizer"):
        load_generator(model_copy)


def test_damaged_heads_break_only_the_measures_that_need_them(model_copy):
    ExitHeads(d_model=32).save(model_copy, metadata={"num_layers": 4})
    cut_short(model_copy / HEADS_FILE)
    generator = load_generator(model_copy)
    input_ids = torch.tensor([[5, 6, 7, 1]])
    for measure in ("full", "softmax"):
        output = generator.generate(input_ids, None, ExitPolicy(measure=measure, min_exit_layer=1), max_new_tokens=3)
        assert output.tokens[0], measure
    with pytest.raises(ModelLoadError, match=rf"{HEADS_FILE} is damaged or incomplete .*mee-bench train-heads"):
        generator.generate(input_ids, None, ExitPolicy(measure="lstm", min_exit_layer=1), max_new_tokens=3)
    with pytest.raises(ModelLoadError, match=rf"{HEADS_FILE} is damaged or incomplete"):
        load_generator(model_copy, require_heads=True)
