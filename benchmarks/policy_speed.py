"""Speed of real exit policies on the embedded default model and real sentences, side by side.

A sweep times each trial once, so its speedups also carry the machine's drift between trials
(about +-10% on a 2-core machine). Here every policy decodes the same held-out Tatoeba
sentences one at a time (batch 1, the paper's setting) with the model's own exit heads, and
the repetitions are interleaved, so drift hits all policies alike. Reported per policy: the
median decoder ms/token over repetitions, the speedup over `full` and the average exit layer.

    python benchmarks/policy_speed.py [--quick] [--sentences 40] [--repeats 5] [--threads 1]
    python benchmarks/policy_speed.py --device cuda --dtype bfloat16 --batches 1,16 --out results/bench/policy_speed_gpu.json

With --batches, sentences are also decoded in padded batches of that many (one table row
per policy and batch size). Writes results/bench/policy_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from itertools import islice
from pathlib import Path

import torch
from tabulate import tabulate

from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.harness.data import local_split_path, read_jsonl

from mee_bench.paths import DATA_DIR_ENV
from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_generator
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.engine.policy import ExitPolicy

REPO = Path(__file__).resolve().parent.parent
POLICIES = {
    "full": ExitPolicy("full"),
    "fixed, layer 2": ExitPolicy("fixed", min_exit_layer=2),
    "lstm 0.5, from 2": ExitPolicy("lstm", threshold=0.5, min_exit_layer=2),
    "lstm 0.9, from 4": ExitPolicy("lstm", threshold=0.9, min_exit_layer=4),
    "saturation 0.95, from 4": ExitPolicy("saturation", threshold=0.95, min_exit_layer=4),
    "softmax 0.5, from 2": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2),
    "monotonic_heuristic 0.9, from 4": ExitPolicy("monotonic_heuristic", threshold=0.9, min_exit_layer=4),
}


def tatoeba_prompts(count: int) -> list[str]:
    """The task prompts of the first `count` distinct English sentences of the held-out Tatoeba split."""
    path = local_split_path(TATOEBA_ENFR.dataset, TATOEBA_ENFR.split)
    if path is None:
        raise SystemExit(f"no {TATOEBA_ENFR.dataset}/{TATOEBA_ENFR.split}.jsonl: "
                         f"set {DATA_DIR_ENV} to a data root holding it")
    distinct = dict.fromkeys(TATOEBA_ENFR.prompt(row) for row in read_jsonl(path))
    return list(islice(distinct, count))


def decode_all(generator: EarlyExitGenerator, inputs: list[tuple], policy: ExitPolicy) -> tuple[float, int, list[int]]:
    """Decoder seconds, tokens and exit layers of every (ids, mask) batch of sentences."""
    seconds, tokens, layers = 0.0, 0, []
    for ids, mask in inputs:
        out = generator.generate(ids, mask, policy, max_new_tokens=64)
        seconds += out.stats.decoder_s
        tokens += out.stats.tokens
        layers += [layer for row in out.exit_layers for layer in row]
    return seconds, tokens, layers


def batched_inputs(generator: EarlyExitGenerator, prompts: list[str], batch: int) -> list[tuple]:
    """The prompts as padded (ids, mask) batches; a sentence alone carries no mask, as in a sweep."""
    if batch == 1:
        return [(generator.tokenize([prompt])[0], None) for prompt in prompts]
    return [generator.tokenize(prompts[start : start + batch]) for start in range(0, len(prompts), batch)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 sentences, 2 repetitions (a smoke run)")
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the sweep gives each trial 1)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="a saved T5 with exit heads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1], help="e.g. 1,16")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "policy_speed.json")
    args = parser.parse_args(argv)
    sentences, repeats = (8, 2) if args.quick else (args.sentences, args.repeats)
    torch.set_num_threads(args.threads)

    generator = load_generator(args.model, args.dtype, args.device, require_heads=True)
    prompts = tatoeba_prompts(sentences)
    rows = []
    for batch in args.batches:
        inputs = batched_inputs(generator, prompts, batch)
        for policy in POLICIES.values():
            decode_all(generator, inputs[:2], policy)  # warm-up

        ms_per_token: dict[str, list[float]] = {name: [] for name in POLICIES}
        exit_layers: dict[str, list[int]] = {}
        for _ in range(repeats):
            for name, policy in POLICIES.items():
                seconds, tokens, layers = decode_all(generator, inputs, policy)
                ms_per_token[name].append(1000 * seconds / tokens)
                exit_layers[name] = layers
        full = statistics.median(ms_per_token["full"])
        rows += [
            {
                "policy": name,
                **({"batch": batch} if args.batches != [1] else {}),
                "ms_per_token": statistics.median(samples),
                "speedup_vs_full": full / statistics.median(samples),
                "slowest_to_fastest": max(samples) / min(samples),
                "avg_exit_layer": statistics.fmean(exit_layers[name]),
            }
            for name, samples in ms_per_token.items()
        ]
    print(tabulate(rows, headers="keys", floatfmt=".3f"))

    result = {
        "policies": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    **({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {})},
        "settings": {"model": args.model.name, "task": TATOEBA_ENFR.name, "sentences": sentences,
                     "repeats": repeats, "batch": args.batches[0] if len(args.batches) == 1 else args.batches,
                     "max_new_tokens": 64, "dtype": args.dtype, "device": args.device},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
