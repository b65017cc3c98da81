"""`mee-bench train CONFIG [key=value ...]`: train a T5 or a decoder-only model with the final / weighted_ce /
weighted_ce_kd objective.

CONFIG is a YAML file or a preset name from configs/train/. The run lives in
`output_dir`: a checkpoint every few minutes (safetensors model + optimiser state, JSON
trainer state), the tokenizer, `metrics.jsonl` curves and a `training.json` model card.
Started again with the same config, it resumes from the last checkpoint with the same
data order; an output dir holding a different run is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mee_bench.engine.runner import LayerRunner, build_runner
from mee_bench.engine.t5 import growing_generate_cache
from mee_bench.provenance import hardware_info
from mee_bench.train.checkpoint import (
    CHECKPOINT_DIR,
    METRICS,
    RunError,
    check_init,
    continued_from,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    save_final_model,
    write_card,
)
from mee_bench.train.config import ConfigError, learning_rate, load_config
from mee_bench.train.data import DataError, MixtureBatches, TokenizedSource, read_examples
from mee_bench.train.objectives import Objective, decoder_layer_states
from mee_bench.train.precision import PrecisionChoice, choose_precision
from mee_bench.train.tokenizer import SPIECE_FILE


def load_sources(cfg, causal: bool = False) -> list[tuple[object, list]]:
    return [(src, read_examples(src.path, src.task, cfg.data.limit, causal)) for src in cfg.data.sources]


def is_decoder_only(cfg) -> bool:
    """Whether the run trains a decoder-only model: `model.init`'s own kind, else `model.family`."""
    if not cfg.model.init:
        return cfg.model.family != "t5"
    from transformers import AutoConfig

    from mee_bench.engine.loading import model_kind

    return model_kind(AutoConfig.from_pretrained(str(cfg.model.init))) == "decoder-only"


def build_tokenizer(cfg, output: Path, sources):
    from transformers import AutoTokenizer

    if (output / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(output))
    source = cfg.tokenizer.path or cfg.model.init
    if source:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if (Path(source) / SPIECE_FILE).is_file():  # the SentencePiece model too, for slow-tokenizer users
            shutil.copy(Path(source) / SPIECE_FILE, output / SPIECE_FILE)
    else:
        from mee_bench.train.tokenizer import train_sentencepiece

        examples = [e for _, rows in sources for e in rows]
        train_sentencepiece(examples, output, cfg.tokenizer.vocab_size, cfg.seed)
        return AutoTokenizer.from_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return tokenizer


def build_model(cfg, tokenizer, causal: bool = False):
    from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

    if cfg.model.init:
        if causal:
            model = AutoModelForCausalLM.from_pretrained(
                str(cfg.model.init), dtype=torch.float32, attn_implementation="sdpa"
            )
        else:
            model = T5ForConditionalGeneration.from_pretrained(str(cfg.model.init), dtype=torch.float32)
        full_precision = Path(cfg.model.init) / CHECKPOINT_DIR / "model.safetensors"
        if full_precision.is_file():  # a run of ours: its fp32 weights, not the bf16 copy beside them
            from safetensors.torch import load_model as load_weights

            load_weights(model, str(full_precision))
        if not causal:
            model.config.dropout_rate = cfg.model.dropout_rate
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.model.dropout_rate
        return model
    torch.manual_seed(cfg.seed)
    if causal:
        return AutoModelForCausalLM.from_config(decoder_only_config(cfg, tokenizer), attn_implementation="sdpa")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.model.d_model,
        d_kv=cfg.model.d_kv,
        d_ff=cfg.model.d_ff,
        num_layers=cfg.model.num_layers,
        num_decoder_layers=cfg.model.num_decoder_layers,
        num_heads=cfg.model.num_heads,
        feed_forward_proj=cfg.model.feed_forward_proj,
        dropout_rate=cfg.model.dropout_rate,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5ForConditionalGeneration(config)


def decoder_only_config(cfg, tokenizer):
    """A new decoder-only model of `model.family` in the run's shape; room for the longest prompt and target."""
    from transformers import AutoConfig

    m = cfg.model
    positions = cfg.data.max_source_tokens + cfg.data.max_target_tokens
    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if m.family == "gpt2":
        dropout = dict(resid_pdrop=m.dropout_rate, embd_pdrop=m.dropout_rate, attn_pdrop=m.dropout_rate)
        return AutoConfig.for_model(
            "gpt2",
            n_embd=m.d_model,
            n_head=m.num_heads,
            n_inner=m.d_ff,
            n_layer=m.num_decoder_layers,
            n_positions=positions,
            **dropout,
            **tokens,
        )
    return AutoConfig.for_model(
        m.family,
        hidden_size=m.d_model,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.num_decoder_layers,
        max_position_embeddings=positions,
        attention_dropout=m.dropout_rate,
        **tokens,
    )


def evaluate(model, runner, objective, validation, tokenizer, cfg) -> dict:
    """Per-layer validation CE (all layers, any objective) and full-depth greedy BLEU on a few examples."""
    import sacrebleu

    from mee_bench.engine.decoding import EarlyExitGenerator
    from mee_bench.engine.policy import ExitPolicy
    from mee_bench.train.data import collate, encode_pairs

    model.eval()
    examples = validation[: cfg.data.validation.examples]
    eager = torch.compiler.set_stance("force_eager")  # a compiled training graph would recompile for generate
    per_layer, hypotheses = None, []
    eval_objective = Objective("weighted_ce", label_smoothing=0.0, chunk_tokens=objective.chunk_tokens)
    with torch.no_grad(), autocast(cfg), eager:
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            causal = not runner.is_encoder_decoder
            sources, targets = encode_pairs(
                tokenizer, chunk, cfg.data.max_source_tokens, cfg.data.max_target_tokens, causal
            )
            batch = collate(list(zip(sources, targets)), runner.start_token_id, pad_id(tokenizer, runner))
            batch = to_device(batch, runner.device)
            _, parts = eval_objective(runner, decoder_layer_states(runner, batch), batch["labels"])
            layer_ce = [parts[f"ce{i}"] * len(chunk) for i in range(1, runner.num_layers + 1)]
            per_layer = layer_ce if per_layer is None else [a + b for a, b in zip(per_layer, layer_ce)]
            if causal:  # the engine's full policy is token for token the model's own greedy generate
                output = EarlyExitGenerator(model).generate(
                    batch["input_ids"], batch["attention_mask"], ExitPolicy("full"), 64
                )
                hypotheses += tokenizer.batch_decode(output.tokens, skip_special_tokens=True)
                continue
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=64,
                num_beams=1,
                do_sample=False,
                **growing_generate_cache(model),
            )
            hypotheses += tokenizer.batch_decode(generated, skip_special_tokens=True)
    model.train()
    bleu = sacrebleu.corpus_bleu(hypotheses, [[e.target for e in examples]])
    return {
        "val_ce": [round(x / len(examples), 4) for x in per_layer],
        "bleu": round(bleu.score, 2),
        "sample": hypotheses[0],
    }


def autocast(cfg) -> torch.autocast:
    """bf16 autocast on the run's device when `precision: bf16`, a no-op otherwise (`auto` is resolved
    by `resolve_precision` before training; the loss and its log-softmax read fp32 logits either way)."""
    return torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def resolve_precision(cfg) -> tuple[object, PrecisionChoice]:
    """The config with `precision: auto` replaced by what this machine's probe chose, and the choice."""
    choice = choose_precision(cfg.precision, cfg.device, model_width(cfg))
    return dataclasses.replace(cfg, precision=choice.precision), choice


def model_width(cfg) -> int:
    """d_model of the model the run trains (model.init's own when it fine-tunes one)."""
    if not cfg.model.init:
        return cfg.model.d_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(cfg.model.init))
    return getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or config.n_embd


def compile_for_training(model) -> None:
    """torch.compile, in place, the modules a training step calls (so state-dict names do not change):
    T5's encoder and decoder, a decoder-only model's base model. Shapes vary from batch to batch, so
    the graphs are compiled with dynamic shapes once instead of once per shape."""
    parts = (model.encoder, model.decoder) if model.config.is_encoder_decoder else (model.base_model,)
    for part in parts:
        part.compile(dynamic=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def training_device(cfg) -> torch.device:
    """The configured device, refused in one line when CUDA is asked for but absent."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available; set device=cpu")
    return torch.device(cfg.device)


def pad_id(tokenizer, runner: LayerRunner) -> int:
    """The padding id of batches: the tokenizer's, else EOS (GPT-2's tokenizer has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else runner.eos_token_id


def budget_left(cfg, state: dict) -> bool:
    steps, minutes = cfg.budget.steps, cfg.budget.minutes
    if steps is not None and state["step"] >= steps:
        return False
    return minutes is None or state["wall_time"] < minutes * 60


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        fused=True,  # one kernel per step instead of ~10 elementwise passes per tensor: 2-4x faster steps here
    )


def train_step(
    model, runner: LayerRunner, objective: Objective, optimizer, batch: dict, cfg, step: int = 0
) -> dict[str, float]:
    """One optimiser step on one batch (`step` seeds the objective's samples); returns the logged loss parts."""
    with autocast(cfg):
        loss, parts = objective(runner, decoder_layer_states(runner, batch), batch["labels"], step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


def make_objective(cfg) -> Objective:
    return Objective(**dataclasses.asdict(cfg.objective), seed=cfg.seed)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM after saving its checkpoint; the same command resumes it."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT and SIGTERM ask training to stop after the current step, checkpoint saved (a second
    signal stops at once); yields the question "was a stop asked for?". Outside the main thread
    (where Python cannot take signals) nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg, stop: Callable[[], bool] = lambda: False) -> Path:
    """Run (or resume) the training run described by a validated config; returns the output dir.

    When `stop()` turns true the run saves its checkpoint and raises `TrainingInterrupted`.
    """
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    device = training_device(cfg)
    check_init(cfg)
    output, resuming = prepare_output_dir(cfg)
    card_cfg, (cfg, precision) = cfg, resolve_precision(cfg)
    causal = is_decoder_only(cfg)
    sources = load_sources(cfg, causal)
    validation = read_examples(cfg.data.validation.path, cfg.data.validation.task, cfg.data.validation.examples, causal)
    tokenizer = build_tokenizer(cfg, output, sources)
    model = build_model(cfg, tokenizer, causal).to(device)
    optimizer = build_optimizer(cfg, model)
    if cfg.compile:
        compile_for_training(model)
    state = {"step": 0, "epoch": 0, "position": 0, "wall_time": 0.0, "tokens": 0, **continued_from(cfg)}
    if resuming:
        state = load_checkpoint(output, model, optimizer)
    tokenized = [
        TokenizedSource(s.name, rows, tokenizer, cfg.data.max_source_tokens, cfg.data.max_target_tokens, causal)
        for s, rows in sources
    ]
    mixture = MixtureBatches(
        tokenized, [s.weight for s, _ in sources], cfg.data.batch_tokens, cfg.seed, cfg.data.bucket_batches
    )
    objective = make_objective(cfg)
    runner = build_runner(model)
    records = (
        [json.loads(line) for line in (output / METRICS).read_text().splitlines()]
        if (output / METRICS).is_file()
        else []
    )
    records = [r for r in records if r["step"] <= state["step"]]  # steps after the checkpoint run again
    (output / METRICS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    history = [r for r in records if r["kind"] == "eval"]
    sessions = [r for r in records if r["kind"] == "session"]
    model.train()
    started, last_save = time.monotonic(), time.monotonic()
    wall_at_start, tokens_window, window_start = state["wall_time"], 0, time.monotonic()
    progress = tqdm(
        total=cfg.budget.steps,
        initial=state["step"],
        unit="step",
        mininterval=1 if sys.stderr.isatty() else 30,
        dynamic_ncols=True,
        desc=f"train {cfg.objective.name}",
    )
    metrics = (output / METRICS).open("a", encoding="utf-8")
    session = {
        "kind": "session",
        "step": state["step"],
        "cpu": hardware_info(cfg.threads)["cpu_model"],
        **precision.record(),
    }
    sessions.append(session)
    metrics.write(json.dumps(session) + "\n")
    progress.write(f"precision {precision.precision} ({precision.reason})")

    def checkpoint(status: str) -> None:
        save_checkpoint(output, model, optimizer, state)
        save_final_model(output, model, cfg.save_dtype)
        write_card(output, card_cfg, state, status, history, sessions)

    def run_eval() -> None:
        result = {
            "kind": "eval",
            "step": state["step"],
            "tokens": state["tokens"],
            "minutes": round(state["wall_time"] / 60, 3),
            **evaluate(model, runner, objective, validation, tokenizer, cfg),
        }
        history.append(result)
        metrics.write(json.dumps(result, ensure_ascii=False) + "\n")
        metrics.flush()
        progress.write(f"eval step {result['step']}: BLEU {result['bleu']} val CE per layer {result['val_ce']}")

    while budget_left(cfg, state) and not stop():
        batches = mixture.epoch(state["epoch"])
        if state["position"] >= len(batches):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            continue
        batch = mixture.collate(batches[state["position"]], runner.start_token_id, pad_id(tokenizer, runner))
        lr = learning_rate(cfg, state["step"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_tokens = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        parts = train_step(model, runner, objective, optimizer, to_device(batch, device), cfg, state["step"])
        state["step"] += 1
        state["position"] += 1
        state["tokens"] += batch_tokens
        state["wall_time"] = wall_at_start + time.monotonic() - started
        tokens_window += batch_tokens
        progress.update(1)
        if state["step"] % cfg.log_every_steps == 0:
            rate = tokens_window / max(1e-9, time.monotonic() - window_start)
            layer_ce = " ".join(f"{parts[k]:.2f}" for k in parts if k.startswith("ce"))
            progress.set_postfix_str(
                f"loss={parts['loss']:.3f} ce=[{layer_ce}] tok/s={rate:.0f} lr={lr:.2e}", refresh=False
            )
            record = {
                "kind": "train",
                "step": state["step"],
                "minutes": round(state["wall_time"] / 60, 3),
                "lr": lr,
                "tokens_per_s": round(rate),
                **{k: round(v, 4) for k, v in parts.items()},
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            tokens_window, window_start = 0, time.monotonic()
        if cfg.eval_every_steps and state["step"] % cfg.eval_every_steps == 0:
            run_eval()
        if time.monotonic() - last_save >= cfg.checkpoint_minutes * 60:
            checkpoint("in progress")
            last_save = time.monotonic()
    progress.close()
    if budget_left(cfg, state):  # stopped on request: keep every finished step
        metrics.close()
        checkpoint("in progress")
        raise TrainingInterrupted(
            f"stopped at step {state['step']}; checkpoint saved in {output}: run the same command to resume"
        )
    if cfg.eval_every_steps and (not history or history[-1]["step"] != state["step"]):
        run_eval()
    metrics.close()
    checkpoint("complete")
    return output


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mee-bench train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML file or a preset name from configs/train/ (default, quick, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. budget.steps=100 output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        with stop_on_signals() as stop:
            output = train(cfg, stop)
    except (ConfigError, DataError, RunError) as err:
        print(f"mee-bench train: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupted:
        print(f"mee-bench train: {interrupted}", file=sys.stderr)
        return 130
    print(f"model written to {output}")
    return 0
