"""The default-model campaign's compute study: which shape and objective to train, chosen from measurements.

`run` trains each arm (a labelled set of overrides of the `default` preset) for the same number
of steps, hence the same tokens, one after another, each resumable (`mee-bench train`, output in
runs/study/<label>). `report` reads their validation curves, fits last-layer CE against tokens
(L(D) = E + A * D^-alpha), extrapolates each to the campaign's budget, times every shape's greedy
decode per token against today's default (paired, in lockstep, nothing else running) and states
each shape's bf16 file size, then writes results/compute_study/{study.json, study.md, curves.png}.

    python benchmarks/compute_study.py run [--steps 300] [--arms base reference deep]
    python benchmarks/compute_study.py report [--campaign-tokens 1e8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date

import numpy as np
import torch
from bench_io import write_result

from mee_bench.formatting import MISSING
from mee_bench.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from mee_bench.provenance import hardware_info

RUNS = REPO_ROOT / "runs" / "study"
OUTPUT = REPO_ROOT / "results" / "compute_study"
COMMON = ["optim.schedule=constant", "eval_every_steps=100", "checkpoint_minutes=4", "budget.minutes=null"]
ARMS = {
    "base": ["objective.name=weighted_ce"],
    # today's fp32 reference path (every position at every layer, 50-batch buckets): the A/B of the fast path
    "reference": [
        "objective.name=weighted_ce",
        "objective.shallow_token_fraction=1.0",
        "data.bucket_batches=50",
        "precision=fp32",
    ],
    "deep": ["objective.name=weighted_ce", "model.num_layers=3", "model.num_decoder_layers=8"],
    "wide-ff": ["objective.name=weighted_ce", "model.num_layers=3", "model.num_decoder_layers=7", "model.d_ff=1024"],
}
FILE_LIMIT_MB = 30.0
DECODE_LIMIT = 1.2  # time per token against today's default


def run_arms(arms: list[str], steps: int) -> None:
    for label in arms:
        command = [
            sys.executable,
            "-m",
            "mee_bench.cli",
            "train",
            "default",
            *ARMS[label],
            *COMMON,
            f"budget.steps={steps}",
            f"output_dir={RUNS / label}",
        ]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


def evaluations(label: str) -> list[dict]:
    metrics = RUNS / label / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [r for r in records if r["kind"] == "eval"]


def power_law(tokens: np.ndarray, floor: float, scale: float, exponent: float) -> np.ndarray:
    return floor + scale * (tokens / 1e6) ** -exponent


def fit_curve(tokens: list[float], ce: list[float]) -> dict | None:
    """Least-squares L(D) = E + A (D / 1M)^-alpha over the evaluations past the first 20% of tokens
    (None with fewer than five of them)."""
    from scipy.optimize import curve_fit

    points = [(t, c) for t, c in zip(tokens, ce) if t >= 0.2 * max(tokens)]
    if len(points) < 5:  # three parameters: fewer points than five would be fitted, not measured
        return None
    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    try:
        (floor, scale, exponent), _ = curve_fit(
            power_law, x, y, p0=(min(y) - 1.0, 1.0, 0.5), bounds=([0.0, 0.0, 0.01], [min(y), 100.0, 3.0]), maxfev=20000
        )
    except (RuntimeError, ValueError):
        return None
    return {"floor": round(floor, 4), "scale": round(scale, 4), "exponent": round(exponent, 4)}


def bf16_file_mb(label: str) -> float:
    """Size of the run's saved model file (training saves it in bf16, as the default ships)."""
    return round((RUNS / label / "model.safetensors").stat().st_size / 1e6, 2)


SHAPE_KEYS = ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "vocab_size")


def same_shape_as_default(label: str) -> bool:
    """Whether the arm's model has the embedded default's shape (its decode time is then the default's)."""
    arm, default = (json.loads((path / "config.json").read_text()) for path in (RUNS / label, DEFAULT_MODEL_DIR))
    return all(arm.get(key) == default.get(key) for key in SHAPE_KEYS)


def decode_ratio(label: str, prompts: int, tokens: int) -> dict:
    """Time per generated token of the arm's model over today's default's (full depth, batch 1, lockstep)."""
    from policy_speed import task_prompts

    from mee_bench.engine.decoding import EarlyExitGenerator
    from mee_bench.engine.loading import load_generator
    from mee_bench.engine.policy import ExitPolicy
    from mee_bench.timing.pairing import PairedBlocks

    default, candidate = (
        load_generator(DEFAULT_MODEL_DIR, dtype=torch.float32),
        load_generator(RUNS / label, dtype=torch.float32),
    )
    full = ExitPolicy("full")

    def steps(generator: EarlyExitGenerator):
        return lambda text: generator.decode_steps(*generator.tokenize([text]), full, tokens, until_truncated=True)

    paired = PairedBlocks(
        steps(default),
        steps(candidate),
        target_half_width=0.03,
        allowance_s=60,
        min_repeats=10,
        units=lambda output: output.stats.tokens,
        lockstep=True,
    )
    for text in task_prompts(prompts):
        paired.run(text)
    speedup = paired.speedup()  # default time / candidate time
    return {
        "time_ratio": round(1 / speedup.ratio, 3),
        "low": round(1 / speedup.high, 3),
        "high": round(1 / speedup.low, 3),
    }


def report(campaign_tokens: float, prompts: int) -> None:
    from matplotlib.figure import Figure

    torch.set_num_threads(2)
    result = {
        "date": date.today().isoformat(),
        "machine": hardware_info(2)["cpu_model"],
        "campaign_tokens": campaign_tokens,
        "common_overrides": COMMON,
        "arms": {},
    }
    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for label, overrides in ARMS.items():
        history = evaluations(label)
        if not history:
            continue
        tokens = [r["tokens"] for r in history]
        last = [r["val_ce"][-1] for r in history]
        fit = fit_curve(tokens, last)
        card = json.loads((RUNS / label / "training.json").read_text())
        arm = {
            "overrides": overrides,
            "complete": card["status"] == "complete",
            "tokens": tokens[-1],
            "val_ce_per_layer": history[-1]["val_ce"],
            "bleu": history[-1]["bleu"],
            "fit": fit,
            "extrapolated_last_ce": round(float(power_law(np.array(campaign_tokens), **fit)), 3) if fit else None,
            "bf16_file_mb": bf16_file_mb(label),
            "decode_time_vs_default": decode_ratio(label, prompts, 24) if not same_shape_as_default(label) else None,
        }
        result["arms"][label] = arm
        axes[0].plot(np.array(tokens) / 1e6, last, marker="o", label=label)
        axes[1].plot(range(1, len(history[-1]["val_ce"]) + 1), history[-1]["val_ce"], marker="o", label=label)
        print(label, arm, flush=True)
    axes[0].set(xlabel="tokens (M)", ylabel="last-layer validation CE", title="CE against tokens")
    axes[1].set(xlabel="decoder layer", ylabel="validation CE", title="per-layer CE at the end")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT / "curves.png", dpi=110)
    write_result(OUTPUT / "study.json", result)
    write_table(result)


def write_table(result: dict) -> None:
    from tabulate import tabulate

    rows = []
    for label, arm in result["arms"].items():
        decode = arm["decode_time_vs_default"]
        decode_cell = (
            "1.00x (today's shape)"
            if decode is None
            else (f"{decode['time_ratio']:.2f}x [{decode['low']:.2f}, {decode['high']:.2f}]")
        )
        rows.append(
            [
                label,
                ", ".join(arm["overrides"]),
                f"{arm['tokens'] / 1e6:.2f}M",
                " ".join(f"{c:.2f}" for c in arm["val_ce_per_layer"]),
                arm["bleu"],
                MISSING if arm["extrapolated_last_ce"] is None else arm["extrapolated_last_ce"],
                decode_cell,
                arm["bf16_file_mb"],
            ]
        )
    headers = [
        "arm",
        "overrides of `default`",
        "tokens",
        "val CE per layer",
        "BLEU (200)",
        f"last CE at {result['campaign_tokens'] / 1e6:.0f}M (fit)",
        "decode time vs default",
        "bf16 MB",
    ]
    page = [
        "# Compute study for the default-model campaign",
        "",
        "<!-- generated by `python benchmarks/compute_study.py report`; do not edit by hand -->",
        f"{result['machine']}, {result['date']}. Every arm: `mee-bench train default` with "
        f"{', '.join(result['common_overrides'])} and the overrides below, for the same number of steps. "
        f"Limits: decode at most {DECODE_LIMIT}x today's default per token, at most {FILE_LIMIT_MB:.0f} MB per file.",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        *fast_path_comparison(),
        "![curves](curves.png)",
        "",
    ]
    (OUTPUT / "study.md").write_text("\n".join(page))


def fast_path_comparison() -> list[str]:
    """The training issue's A/B: per-layer validation CE of the fast path (`base`) over the fp32 reference
    path (`reference`) at each step both evaluated, with the real tokens each had seen by then."""
    base, reference = ({r["step"]: r for r in evaluations(label)} for label in ("base", "reference"))
    steps = sorted(set(base) & set(reference))
    if not steps:
        return []
    from tabulate import tabulate

    rows = []
    for step in steps:
        ratios = [b / r - 1 for b, r in zip(base[step]["val_ce"], reference[step]["val_ce"])]
        rows.append(
            [
                step,
                f"{base[step]['tokens'] / 1e6:.2f}M",
                f"{reference[step]['tokens'] / 1e6:.2f}M",
                " ".join(f"{100 * x:+.1f}%" for x in ratios),
            ]
        )
    headers = ["step", "tokens (base)", "tokens (reference)", "val CE per layer, base over reference"]
    return [
        "## The fast path against the fp32 reference path",
        "",
        "Same seed, same preset; the fast path packs more real tokens into each step (less padding).",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the arms one after another (each resumes)")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    summary = commands.add_parser("report", help="fit, time and tabulate the arms trained so far")
    summary.add_argument("--campaign-tokens", type=float, default=1e8)
    summary.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    if args.command == "run":
        run_arms(args.arms, args.steps)
    else:
        report(args.campaign_tokens, args.prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
