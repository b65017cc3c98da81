"""Training speed and memory of the default preset: final vs weighted CE (vs FREE) steps/s, and peak RSS.

Targets from the training issue: weighted-CE step time / final-CE step time <= 2.0, and
peak RSS of a default-preset training process <= 6 GB. The three objectives train three
copies of the same model on the same real batches, interleaved step by step, so a busy
shared CPU slows them alike. Peak RSS is read in a separate process that loads the
default preset's data and tokenizer and trains `weighted_ce_kd`, the hungriest objective.

    python benchmarks/train_speed.py [--steps 6] [--threads 2]
Writes results/bench/train_speed.json and prints a table.
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

import torch

from mee_bench.engine.runner import build_runner

from mee_bench.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from mee_bench.train.data import MixtureBatches, TokenizedSource
from mee_bench.train.loop import build_model, build_optimizer, load_sources, make_objective, train_step
from mee_bench.train.config import load_config

OBJECTIVES = ("final", "weighted_ce", "weighted_ce_kd")
TOKENIZER_DIRS = (DEFAULT_MODEL_DIR, REPO_ROOT / "runs" / "default-base")
OUTPUT = REPO_ROOT / "results" / "bench" / "train_speed.json"


def default_tokenizer(cfg, sources):
    """The default model's own tokenizer if one exists, else one trained now as the preset would."""
    from transformers import AutoTokenizer

    for directory in TOKENIZER_DIRS:
        if (directory / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(directory)), str(directory)
    from mee_bench.train.tokenizer import train_sentencepiece

    directory = Path(tempfile.mkdtemp(prefix="mee-tokenizer-"))
    train_sentencepiece([e for _, rows in sources for e in rows], directory, cfg.tokenizer.vocab_size, cfg.seed)
    return AutoTokenizer.from_pretrained(str(directory)), "trained for this benchmark"


def batches(cfg, count: int):
    sources = load_sources(cfg)
    tokenizer, origin = default_tokenizer(cfg, sources)
    tokenized = [
        TokenizedSource(s.name, rows, tokenizer, cfg.data.max_source_tokens, cfg.data.max_target_tokens)
        for s, rows in sources
    ]
    mixture = MixtureBatches(
        tokenized, [s.weight for s, _ in sources], cfg.data.batch_tokens, cfg.seed, cfg.data.bucket_batches
    )
    chosen = mixture.epoch(0)[:count]
    return tokenizer, origin, [mixture.collate(i, 0, tokenizer.pad_token_id) for i in chosen]


def speed(steps: int, threads: int, precision: str) -> dict:
    cfg = load_config("default", [f"threads={threads}", f"precision={precision}"])
    torch.set_num_threads(threads)
    tokenizer, origin, data = batches(cfg, steps + 1)
    base = build_model(cfg, tokenizer)
    runs = {}
    for name in OBJECTIVES:
        cfg_o = copy.deepcopy(cfg)
        cfg_o.objective.name = name
        model = copy.deepcopy(base).train()
        runs[name] = (model, build_runner(model), make_objective(cfg_o), build_optimizer(cfg_o, model), cfg_o, [])
    for index, batch in enumerate(data):
        for name, (model, runner, objective, optimizer, cfg_o, times) in runs.items():
            start = time.perf_counter()
            train_step(model, runner, objective, optimizer, batch, cfg_o)
            if index:  # the first step of each warms allocator and kernels
                times.append(time.perf_counter() - start)
    tokens = sum(int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in data[1:])
    result = {
        "threads": threads,
        "precision": precision,
        "steps": steps,
        "batch_tokens": cfg.data.batch_tokens,
        "tokenizer": origin,
        "objectives": {},
    }
    for name, (*_, times) in runs.items():
        total = sum(times)
        result["objectives"][name] = {
            "s_per_step": round(total / len(times), 3),
            "steps_per_s": round(len(times) / total, 3),
            "tokens_per_s": round(tokens / total),
        }
    final = result["objectives"]["final"]["s_per_step"]
    for name in OBJECTIVES[1:]:
        result["objectives"][name]["time_ratio_vs_final"] = round(result["objectives"][name]["s_per_step"] / final, 3)
    return result


def peak_rss_child(steps: int, threads: int, precision: str) -> None:
    cfg = load_config("default", [f"threads={threads}", f"precision={precision}", "objective.name=weighted_ce_kd"])
    torch.set_num_threads(threads)
    tokenizer, _, data = batches(cfg, steps)
    model = build_model(cfg, tokenizer).train()
    runner, objective, optimizer = build_runner(model), make_objective(cfg), build_optimizer(cfg, model)
    longest = max(data, key=lambda b: b["input_ids"].numel() + b["labels"].numel())
    for batch in [longest, *data]:
        train_step(model, runner, objective, optimizer, batch, cfg)
    print(json.dumps({"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per objective (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        peak_rss_child(args.steps, args.threads, args.precision)
        return 0
    result = speed(args.steps, args.threads, args.precision)
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-child",
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--precision",
            args.precision,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result["peak_rss_gb_default_preset"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    result["targets"] = {"weighted_ce_time_ratio_max": 2.0, "peak_rss_gb_max": 6.0}
    print(f"{'objective':<16} {'s/step':>8} {'steps/s':>8} {'tokens/s':>9} {'x final':>8}")
    for name, row in result["objectives"].items():
        print(
            f"{name:<16} {row['s_per_step']:>8.3f} {row['steps_per_s']:>8.3f} {row['tokens_per_s']:>9} "
            f"{row.get('time_ratio_vs_final', 1.0):>8.2f}"
        )
    print(f"peak RSS, default preset training (weighted_ce_kd): {result['peak_rss_gb_default_preset']:.2f} GB")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
