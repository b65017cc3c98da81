"""Shared test helpers: where the offline tokenizer and data live, the environment of child processes,
tiny T5s built from a config in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mee_bench.engine.measures import ExitMeasure, measure_facts
from mee_bench.engine.t5 import growing_generate_cache
from mee_bench.harness.lm_eval_hook import DISABLE_ENV
from mee_bench.timing.statistics import Speedup

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "t5-tokenizer"
DATA_DIR = SHARED / "data"


def subprocess_env(**overrides: str) -> dict[str, str]:
    """This environment for a child Python: offline, one thread, the lm-eval hook on."""
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        **overrides,
    )
    return env


def tiny_t5_values(vocab_size: int = 32128, layers: int = 4, decoder_layers: int | None = None) -> dict:
    """The keyword arguments of a tiny T5-layout config whose greedy outputs vary (a large init keeps
    it off one token); T5's relatives (mT5, UMT5) take the same keys."""
    return dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=layers,
        num_decoder_layers=decoder_layers or layers,
        num_heads=4,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        dropout_rate=0.0,
        initializer_factor=4.0,
    )


def tiny_config(vocab_size: int = 32128, layers: int = 4, decoder_layers: int | None = None, **overrides):
    from transformers import T5Config

    return T5Config(**{**tiny_t5_values(vocab_size, layers, decoder_layers), **overrides})


def tiny_model(seed: int = 0, **config_overrides):
    """A random T5 whose greedy outputs vary from token to token (a large init keeps it off one repeated token)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_config(**config_overrides)).eval()


CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "granite", "olmo2", "phi3", "smollm3", "gemma3_text")
# Each family's own quirks. Values that keep a random tiny model varied and clear of the near-ties
# that bf16 rounding flips (`full` vs `generate` is compared token for token in bf16 too):
# Granite's multipliers away from 1 but not at Granite 3's 12 / 0.22, an untied Gemma 3 (tied, its
# scaled embedding makes a random model repeat its input) whose logit cap bends its logits.
FAMILY_EXTRAS = {
    "mistral": {"sliding_window": 6},
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},
    "granite": {
        "embedding_multiplier": 1.5,
        "residual_multiplier": 1.2,
        "attention_multiplier": 0.25,
        "logits_scaling": 4.0,
        "tie_word_embeddings": True,
    },
    "phi3": {"partial_rotary_factor": 0.5},  # as Phi-4-mini, which rotates part of each head
    "smollm3": {"no_rope_layers": [1, 1, 0, 1], "tie_word_embeddings": True},  # layer 3 without rotary (NoPE)
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 6,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 3.0,
        "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
}


def tiny_causal_config(family: str, vocab_size: int = 512, layers: int = 4, **overrides):
    """A tiny decoder-only config of `family` (grouped-query attention where the family has it, and the
    family's own quirks: `FAMILY_EXTRAS`)."""
    import transformers

    tokens = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.2)
    if family == "gpt2":
        values = dict(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256, **tokens)
        values.update(overrides)
        return transformers.GPT2Config(**values)
    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **tokens,
    )
    values.update(FAMILY_EXTRAS.get(family, {}))
    values.update(overrides)
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "granite": transformers.GraniteConfig,
        "olmo2": transformers.Olmo2Config,
        "phi3": transformers.Phi3Config,
        "smollm3": transformers.SmolLM3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }[family]
    return config_class(**values)


def tiny_causal_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A random decoder-only model of `family` whose greedy outputs vary (a large init keeps it off one token)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_causal_config(family, **config_overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


TINY_TRAINING = {
    "model": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 3},
    "tokenizer": {"vocab_size": 400},
    "data": {
        "batch_tokens": 600,
        "bucket_batches": 4,
        "max_source_tokens": 32,
        "max_target_tokens": 32,
        "validation": {"examples": 16},
    },
    "objective": {"name": "weighted_ce", "label_smoothing": 0.0},
    "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
    "precision": "fp32",  # the same figures on every machine; `auto` is tested on its own
    "log_every_steps": 1,
    "checkpoint_minutes": 0.0,
    "budget": {"steps": 20},
}


def tiny_train_config(corpus: Path, output: Path, model: dict | None = None, **overrides):
    """A validated config for a tiny run on the tiny corpus; `model` replaces the tiny T5's model
    section (e.g. a decoder-only family), overrides are dotted keys."""
    from omegaconf import OmegaConf

    from mee_bench.train.config import load_config

    values = OmegaConf.create({**TINY_TRAINING, **({"model": model} if model else {})})
    values.output_dir = str(output)
    values.data.sources = [{"name": "tatoeba", "path": str(corpus / "train.jsonl"), "task": "translate_en_fr"}]
    values.data.validation.path = str(corpus / "validation.jsonl")
    config_file = output.parent / f"{output.name}.yaml"
    OmegaConf.save(values, config_file)
    return load_config(config_file, [f"{k}={v}" for k, v in overrides.items()])


class StepSchedule(ExitMeasure):
    """Test measure: token number s exits at layer SCHEDULE[s % len] (0 = full depth)."""

    name = "step_schedule"
    schedule = (2, 0, 1, 3, 0, 2, 2, 0)

    def __init__(self):
        super().__init__()
        self.step_index = -1

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.step_index += 1

    def step(self, layer, hidden, logits):
        target = self.schedule[self.step_index % len(self.schedule)]
        return torch.full((hidden.shape[0],), float(layer == target), device=hidden.device)


def recorded_caches(generator) -> list:
    """The caches `generator`'s runner starts, in order."""
    caches = []
    start = generator.runner.start

    def recording_start(*args):
        cache, first = start(*args)
        caches.append(cache)
        return cache, first

    generator.runner.start = recording_start
    return caches


# Decoding: prompts and Hugging Face's own greedy generate, the reference of every exactness test.

MAX_NEW = 12
SENTENCES = ["Why not start now?", "The boat capsized.", "Since there was nothing left to do, we left."]


def padded_batch(lengths: list[int], side: str = "right", seed: int = 1, vocab: int = 32000):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(2, vocab, (n,), generator=generator)
        tokens[-1] = 1
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens=MAX_NEW, lazy_cache=False) -> list[list[int]]:
    cache = growing_generate_cache(model) if lazy_cache else {}
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, **cache
    )
    rows = []
    for row in out[:, 1:].tolist():
        if 1 in row:
            row = row[: row.index(1) + 1]
        rows.append(row)
    return rows


# Sweep records as the sweep writes them, for the leaderboard, calibration and results-page tests.

HARDWARE = {"cpu_model": "Test CPU", "cpu_count": 2, "torch_threads": 1, "gpu": None}


def record(
    task,
    measure,
    threshold,
    layer,
    quality,
    ms,
    avg,
    status="ok",
    hardware=HARDWARE,
    metric="bleu",
    runs="softmax",
    paired=None,
    load=None,
):
    """A trial record as the sweep writes it; `runs` is the measure a `calibrated` trial runs;
    `paired` a paired speedup (ratio, low, high[, target half-width]), else the record is unpaired."""
    rec = {
        "trial_id": f"{task}-{measure}-{threshold}-{layer}",
        "status": status,
        "trial": {"task": task, "measure": measure, "threshold": threshold, "min_exit_layer": layer},
        "config": {
            "model": {"pretrained": "/m/mee-t5-default", "dtype": "float32", "device": "cpu"},
            "limit": 8,
            "batch_size": 1,
        },
        "hardware": hardware,
        "measure_facts": measure_facts(runs if measure == "calibrated" else measure),
    }
    if status == "ok":
        rec.update(
            metrics={metric: quality, "chrf": quality + 20},
            efficiency={"decode_ms_per_token": ms, "avg_exit_layer": avg, "num_layers": 6},
            energy={
                "energy_kwh": 2e-6,
                "emissions_kg_co2eq": 1e-7,
                "power_source": "estimated",
                "power_detail": "CPU estimated (TDP x CPU load, TDP 8 W)",
                "country_iso_code": "FRA",
            },
        )
    if paired is not None:
        ratio, low, high, *target = paired
        rec["efficiency"]["paired_speedup"] = Speedup(
            ratio, low, high, 12, target_half_width=(target or [0.1])[0], across_work=(low - 0.5, high + 0.5)
        ).as_dict()
    if load is not None:
        rec["efficiency"]["load"] = load
    return rec


RECORDS = [
    record("tatoeba_enfr_mee", "full", None, None, 20.0, 10.0, 6.0),
    record("tatoeba_enfr_mee", "softmax", 0.9, 2, 19.5, 5.0, 3.0),  # within 1 point, 2x
    record("tatoeba_enfr_mee", "softmax", 0.5, 2, 15.0, 2.5, 2.0),  # 4x but 5 points worse
    record("tatoeba_enfr_mee", "saturation", 0.99, 4, 17.0, 8.0, 5.0),  # never within 1 point
    record("tatoeba_enfr_mee", "oracle", None, 2, 20.0, 11.0, 2.5),
    record("tatoeba_enfr_mee", "lstm", 0.5, 4, None, None, None, status="failed"),
]


def write_sweep(tmp_path, records, measures=None):
    (tmp_path / "records").mkdir(parents=True)
    for rec in records:
        (tmp_path / "records" / f"{rec['trial_id']}.json").write_text(json.dumps(rec))
    if measures:
        (tmp_path / "sweep.json").write_text(
            json.dumps({"fingerprint": "x", "config": {"name": "demo", "measures": measures}})
        )
    return tmp_path
