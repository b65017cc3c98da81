"""Training speed of a preset against today's fp32 reference path, interleaved step by step, and peak RSS.

For each objective, two copies of the same initial model train side by side: the reference
(fp32, every shallow layer's CE on every position, the old 50-batch length buckets) and the
preset as configured (`precision: auto` resolved by its probe, its `shallow_token_fraction`,
its buckets). They take turns one step at a time, so a busy shared CPU slows both alike; each
path's tokens per second counts the real (unpadded) tokens of its own batches. Peak RSS is
read in a separate process that trains the preset's hungriest objective on its longest batch.

    python benchmarks/train_speed.py [--preset default] [--steps 8] [--objectives final weighted_ce]
Writes results/bench/train_speed.json (per objective `speedup_vs_fp32_reference` and
`padding_fraction`) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_io import write_result

from mee_bench.engine.runner import build_runner
from mee_bench.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from mee_bench.provenance import hardware_info
from mee_bench.train.config import load_config
from mee_bench.train.data import MixtureBatches, TokenizedSource
from mee_bench.train.loop import (
    build_model,
    build_optimizer,
    compile_for_training,
    load_sources,
    make_objective,
    resolve_precision,
    train_step,
)

OBJECTIVES = ("final", "weighted_ce")
REFERENCE = ["precision=fp32", "objective.shallow_token_fraction=1.0", "data.bucket_batches=50"]
OUTPUT = REPO_ROOT / "results" / "bench" / "train_speed.json"
TARGETS = {
    "weighted_ce_speedup_min_with_bf16_units": 3.0,
    "weighted_ce_speedup_min_without_bf16_units": 1.5,
    "final_speedup_min_with_bf16_units": 2.0,
    "padding_fraction_max": 0.10,
    "peak_rss_gb_max": 6.0,
}


def default_tokenizer(cfg, sources):
    """The default model's own tokenizer if one exists, else one trained now as the preset would."""
    from transformers import AutoTokenizer

    if (DEFAULT_MODEL_DIR / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    from mee_bench.train.tokenizer import train_sentencepiece

    directory = Path(tempfile.mkdtemp(prefix="mee-tokenizer-"))
    train_sentencepiece([e for _, rows in sources for e in rows], directory, cfg.tokenizer.vocab_size, cfg.seed)
    return AutoTokenizer.from_pretrained(str(directory))


def preset_batches(cfg, count: int, tokenized=None):
    """(tokenizer, mixture, the first `count` batches of epoch 0, the tokenized sources) of a config."""
    if tokenized is None:
        sources = load_sources(cfg)
        tokenizer = default_tokenizer(cfg, sources)
        tokenized = [
            TokenizedSource(s.name, rows, tokenizer, cfg.data.max_source_tokens, cfg.data.max_target_tokens)
            for s, rows in sources
        ]
        tokenized = (tokenizer, tokenized)
    tokenizer, sources = tokenized
    mixture = MixtureBatches(
        sources, [s.weight for s in cfg.data.sources], cfg.data.batch_tokens, cfg.seed, cfg.data.bucket_batches
    )
    return tokenizer, mixture, mixture.epoch(0)[:count], tokenized


def padding_fraction(mixture: MixtureBatches, epoch: int = 0) -> float:
    """Share of the token slots in an epoch's padded batches that are padding (encoder + decoder)."""
    slots = real = 0
    for batch in mixture.epoch(epoch):
        sources, targets = mixture.source_lengths[batch], mixture.target_lengths[batch]
        slots += len(batch) * (int(sources.max()) + int(targets.max()))
        real += int(sources.sum() + targets.sum())
    return 1.0 - real / slots


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


def speed(preset: str, objective: str, steps: int, threads: int, tokenized, compiled: bool) -> tuple[dict, object]:
    """Reference and preset path of one objective, one step each in turn; the first step of each is a warm-up
    (and, with `compiled`, the preset path's compilation, whose time is reported)."""
    paths = {}
    for label, extra in (("reference", REFERENCE), ("preset", [f"compile={compiled}"])):
        cfg = load_config(preset, [f"threads={threads}", f"objective.name={objective}", *extra])
        cfg, choice = resolve_precision(cfg)
        tokenizer, mixture, chosen, tokenized = preset_batches(cfg, steps + 1, tokenized)
        batches = [mixture.collate(i, 0, tokenizer.pad_token_id) for i in chosen]
        paths[label] = {"cfg": cfg, "choice": choice, "mixture": mixture, "batches": batches, "times": []}
    base = build_model(paths["reference"]["cfg"], tokenized[0])
    for path in paths.values():
        model = copy.deepcopy(base).train()
        if path["cfg"].compile:
            compile_for_training(model)
        path["train"] = (model, build_runner(model), make_objective(path["cfg"]), build_optimizer(path["cfg"], model))
    for step in range(steps + 1):
        for path in paths.values():
            start = time.perf_counter()
            train_step(*path["train"], path["batches"][step], path["cfg"], step)
            path["times"].append(time.perf_counter() - start)
    result = {}
    for label, path in paths.items():
        seconds = float(np.sum(path["times"][1:]))
        result[label] = {
            "compiled": path["cfg"].compile,
            "first_step_s": round(path["times"][0], 1),
            "precision": path["choice"].precision,
            "precision_reason": path["choice"].reason,
            "shallow_token_fraction": path["cfg"].objective.shallow_token_fraction,
            "bucket_batches": path["cfg"].data.bucket_batches,
            "padding_fraction": round(padding_fraction(path["mixture"]), 4),
            "s_per_step": round(seconds / steps, 3),
            "tokens_per_s": round(sum(real_tokens(b) for b in path["batches"][1:]) / seconds),
        }
    result["speedup_vs_fp32_reference"] = round(
        result["preset"]["tokens_per_s"] / result["reference"]["tokens_per_s"], 3
    )
    result["padding_fraction"] = result["preset"]["padding_fraction"]
    return result, tokenized


def peak_rss_child(preset: str, steps: int, threads: int) -> None:
    cfg, _ = resolve_precision(load_config(preset, [f"threads={threads}", "objective.name=weighted_ce_kd"]))
    torch.set_num_threads(threads)
    tokenizer, mixture, chosen, _ = preset_batches(cfg, steps)
    data = [mixture.collate(i, 0, tokenizer.pad_token_id) for i in chosen]
    model = build_model(cfg, tokenizer).train()
    train = (model, build_runner(model), make_objective(cfg), build_optimizer(cfg, model))
    longest = max(data, key=lambda b: b["input_ids"].numel() + b["labels"].numel())
    for step, batch in enumerate([longest, *data]):
        train_step(*train, batch, cfg, step)
    print(json.dumps({"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the preset path (its compile time is reported)"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        peak_rss_child(args.preset, args.steps, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    result = {
        "preset": args.preset,
        "compile": args.compile,
        "threads": args.threads,
        "steps": args.steps,
        "reference": REFERENCE,
        "cpu": hardware_info(args.threads)["cpu_model"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "objectives": {},
    }
    tokenized = None
    for objective in args.objectives:
        result["objectives"][objective], tokenized = speed(
            args.preset, objective, args.steps, args.threads, tokenized, args.compile
        )
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-child",
            "--preset",
            args.preset,
            "--steps",
            "3",
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result["peak_rss_gb_preset"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    result["targets"] = TARGETS
    print(
        f"{'objective':<14} {'path':<10} {'precision':<9} {'padding':>8} {'s/step':>7} {'tokens/s':>9} {'speedup':>8}"
    )
    for name, row in result["objectives"].items():
        for label in ("reference", "preset"):
            entry = row[label]
            speedup = f"{row['speedup_vs_fp32_reference']:.2f}x" if label == "preset" else ""
            print(
                f"{name:<14} {label:<10} {entry['precision']:<9} {entry['padding_fraction']:>8.1%} "
                f"{entry['s_per_step']:>7.3f} {entry['tokens_per_s']:>9} {speedup:>8}"
            )
    print(f"peak RSS, preset training (weighted_ce_kd, longest batch first): {result['peak_rss_gb_preset']:.2f} GB")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
