"""Sweep throughput: trials per minute with 1 worker vs 2 workers, and the model-load share.

Runs the same small grid (one task, `full` plus softmax thresholds) through `run_sweep` on
a local Ray three ways: 1 worker x 1 CPU, 2 workers x 1 CPU, and 1 worker x 2 CPUs (torch
threads). Steady-state trials/min counts from the first trial handed out to the last
record written; end-to-end adds Ray start and model loading. The model-load share is a
worker's load time over the sweep's wall time. Target: 2 workers / 1 worker >= 1.6x.

    python benchmarks/sweep_throughput.py [--trials 8] [--limit 40] [--pretrained PATH]

Uses the embedded default model when it is there, else a random model of its shape with
the T5 tokenizer (speed does not depend on training). Writes results/bench/sweep_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.sweep.config import to_config
from mee_bench.sweep.runner import run_sweep

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO.parent / "shared" / "models" / "t5-tokenizer"
SCENARIOS = (("1 worker x 1 CPU", 1, 1), ("2 workers x 1 CPU", 2, 1), ("1 worker x 2 CPUs", 1, 2))


def stand_in_model(directory: Path) -> Path:
    """A random T5 of the default model's planned shape, saved with the T5 tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        d_model=256,
        d_kv=64,
        d_ff=1024,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=6,
        vocab_size=32128,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    T5ForConditionalGeneration(config).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(directory)
    return directory


def run_scenario(pretrained: str, args: argparse.Namespace, workers: int, cpus: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="meebench", dir="/tmp"))
    try:
        thresholds = [round(0.05 + 0.9 * i / max(args.trials - 2, 1), 3) for i in range(args.trials - 1)]
        config = to_config(
            {
                "name": "throughput",
                "model": {"pretrained": pretrained},
                "tasks": [args.task],
                "measures": ["softmax"],
                "thresholds": {"softmax": thresholds},
                "min_exit_layers": [2],
                "limit": args.limit,
                "max_gen_toks": args.max_gen_toks,
                "batch_size": args.batch_size,
                "output_dir": str(work / "out"),
                "ray": {
                    "num_cpus": 2,
                    "cpus_per_trial": cpus,
                    "max_concurrent": workers,
                    "temp_dir": str(work / "ray"),
                },
                "carbon": {"country_iso_code": "USA"},
            }
        )
        result = run_sweep(config, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if result.failed:
        raise SystemExit(f"{len(result.failed)} trial(s) failed; run the sweep by hand to see why")
    load = sum(result.worker_load_s) / len(result.worker_load_s)
    return {
        "workers": result.workers,
        "cpus_per_worker": cpus,
        "trials": result.ran,
        "wall_s": result.wall_s,
        "run_s": result.run_s,
        "worker_load_s": load,
        "trials_per_min": 60 * result.ran / result.run_s,
        "trials_per_min_end_to_end": 60 * result.ran / result.wall_s,
        "model_load_share": load / result.wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pretrained", help="model directory (default: the embedded default model, else a random stand-in)"
    )
    parser.add_argument("--task", default=TATOEBA_ENFR.name)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--max-gen-toks", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=str(REPO / "results" / "bench" / "sweep_throughput.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="meemodel", dir="/tmp"))
    try:
        if args.pretrained:
            pretrained, label = args.pretrained, args.pretrained
        elif (DEFAULT_MODEL_DIR / "config.json").is_file():
            pretrained, label = str(DEFAULT_MODEL_DIR), "embedded default model"
        else:
            pretrained, label = str(stand_in_model(scratch)), "random stand-in of the default model's shape"
        runs = {}
        for name, workers, cpus in SCENARIOS:
            started = time.perf_counter()
            runs[name] = run_scenario(pretrained, args, workers, cpus)
            print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    one, two, threaded = (runs[name] for name, _, _ in SCENARIOS)
    rows = [
        [
            name,
            r["trials"],
            f"{r['wall_s']:.1f}",
            f"{r['run_s']:.1f}",
            f"{r['trials_per_min']:.1f}",
            f"{r['trials_per_min_end_to_end']:.1f}",
            f"{r['worker_load_s']:.1f}",
            f"{100 * r['model_load_share']:.0f}%",
        ]
        for name, r in runs.items()
    ]
    print(f"\nmodel: {label}; task {args.task}, limit {args.limit}, max_gen_toks {args.max_gen_toks}\n")
    print(
        tabulate(
            rows,
            [
                "workers",
                "trials",
                "wall s",
                "run s",
                "trials/min",
                "trials/min end-to-end",
                "model load s",
                "model-load share",
            ],
            tablefmt="github",
            disable_numparse=True,
        )
    )
    ratio = two["trials_per_min"] / one["trials_per_min"]
    print(f"\n2 workers / 1 worker x 1 CPU: {ratio:.2f}x (target >= 1.6x)")
    print(f"2 workers / 1 worker x 2 CPUs: {two['trials_per_min'] / threaded['trials_per_min']:.2f}x")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "model": label,
                "task": args.task,
                "limit": args.limit,
                "max_gen_toks": args.max_gen_toks,
                "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform()},
                "runs": runs,
                "ratio_2_workers_vs_1": ratio,
            },
            indent=2,
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
