"""Does taking turns token by token shift the speedup? Lockstep against whole examples, side by side.

Every speed figure in mee-bench pairs the policy with `full` in lockstep: the two decodes take
turns one generated token at a time, so the machine's drift lands on both alike. Two decodes
taking turns also share the CPU's caches, which one decode run alone does not, so lockstep
could read a policy with a smaller working set (one that exits early) differently from a run
on its own. This benchmark measures that shift. Each round, every sentence is paired with
`full` both ways in turn (lockstep, and whole decodes one after the other, alternating which
method and which side go first), so the two methods see the same machine within a second of
each other. Both time `full` over exactly the positions the policy generated, as the sweep
does: `full` decodes on past its own end (`until_truncated`), in lockstep until the policy has
stopped, one after the other for as many tokens as the policy wrote on that sentence. Per round
and method the speedup is the ratio of `full`'s ms per generated token to the policy's; the
shift is lockstep's ratio over the whole-example ratio, minus one, with a 95% Student's t
interval over rounds. An interval holding 0 means no measurable shift.

    python benchmarks/pairing_check.py [--sentences 30] [--rounds 8] [--policies lstm fixed full]

Writes results/bench/pairing_check.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from bench_io import write_result
from policy_speed import MAX_NEW_TOKENS, REPO, task_prompts
from scipy import stats
from tabulate import tabulate

from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.steps import run_steps
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.timing.load import LoadMonitor
from mee_bench.timing.pairing import PairedTimer

POLICIES = {
    "full": ExitPolicy("full"),
    "lstm": ExitPolicy("lstm", threshold=0.5, min_exit_layer=2),
    "fixed": ExitPolicy("fixed", min_exit_layer=2),
    "saturation": ExitPolicy("saturation", threshold=0.99, min_exit_layer=2),
}
METHODS = ("lockstep", "whole examples")


def paired_rounds(
    generator, encoded: list, lengths: list[int], policy: ExitPolicy, rounds: int
) -> dict[str, list[float]]:
    """Per method, the speedup of `policy` over `full` in each round (ratio of ms per token);
    `lengths`: how many tokens the policy writes on each sentence."""
    full = ExitPolicy("full")
    ratios: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(rounds):
        timers = {
            "lockstep": PairedTimer(lockstep=True, truncate_baseline=True, units=lambda out: out.stats.tokens),
            "whole examples": PairedTimer(units=lambda out: out.stats.tokens),
        }
        for index, ((ids, mask), length) in enumerate(zip(encoded, lengths)):
            for method in METHODS[:: 1 if (index + round_index) % 2 == 0 else -1]:
                if method == "lockstep":
                    timers[method].block(
                        lambda: generator.decode_steps(ids, mask, full, MAX_NEW_TOKENS, until_truncated=True),
                        lambda: generator.decode_steps(ids, mask, policy, MAX_NEW_TOKENS),
                    )
                else:
                    timers[method].block(
                        lambda: run_steps(generator.decode_steps(ids, mask, full, length, until_truncated=True)),
                        lambda: generator.generate(ids, mask, policy, MAX_NEW_TOKENS),
                    )
        for method, timer in timers.items():
            ratios[method].append(timer.speedup().ratio)
    return ratios


def shift_interval(lockstep: list[float], whole: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Lockstep's speedup relative to the whole-example one, minus 1, over paired rounds: mean and t interval."""
    shifts = np.asarray(lockstep) / np.asarray(whole) - 1
    mean = float(shifts.mean())
    if len(shifts) < 2:
        return {"shift": mean, "low": -np.inf, "high": np.inf}
    spread = float(stats.t.ppf(1 - (1 - confidence) / 2, len(shifts) - 1) * shifts.std(ddof=1) / np.sqrt(len(shifts)))
    return {"shift": mean, "low": mean - spread, "high": mean + spread}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=["lstm", "fixed", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "pairing_check.json")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        raise SystemExit(f"--rounds {args.rounds}: at least 2 rounds are needed for an interval")
    torch.set_num_threads(args.threads)
    generator = load_generator(DEFAULT_MODEL_DIR, "float32", "cpu", require_heads=True)
    encoded = [generator.tokenize([prompt]) for prompt in task_prompts(args.sentences)]
    generator.generate(*encoded[0], ExitPolicy("full"), MAX_NEW_TOKENS)  # warm-up
    rows = []
    with LoadMonitor(threads=args.threads) as load:
        for name in args.policies:
            policy = POLICIES[name]
            # untimed: the first calls read heads and build buffers; the policy's output lengths
            lengths = [generator.generate(ids, mask, policy, MAX_NEW_TOKENS).stats.tokens for ids, mask in encoded]
            ratios = paired_rounds(generator, encoded, lengths, policy, args.rounds)
            rows.append(
                {
                    "policy": name,
                    "policy_settings": policy.as_dict(),
                    "ratios": ratios,
                    **{f"mean_{method}": float(np.mean(ratios[method])) for method in METHODS},
                    **{f"round_scatter_{method}": float(np.std(ratios[method], ddof=1)) for method in METHODS},
                    **shift_interval(ratios["lockstep"], ratios["whole examples"]),
                }
            )
            print(f"{name} done", file=sys.stderr)
    shown = [
        [
            row["policy"],
            row["mean_lockstep"],
            row["mean_whole examples"],
            f"{100 * row['shift']:+.1f}%",
            f"[{100 * row['low']:+.1f}%, {100 * row['high']:+.1f}%]",
            row["round_scatter_lockstep"],
            row["round_scatter_whole examples"],
        ]
        for row in rows
    ]
    print(
        tabulate(
            shown,
            headers=[
                "policy",
                "lockstep",
                "whole examples",
                "shift",
                "95% interval",
                "scatter lockstep",
                "scatter whole",
            ],
            floatfmt=".3f",
        )
    )
    result = {
        "policies": rows,
        "load": load.report(),
        "settings": {
            "sentences": args.sentences,
            "rounds": args.rounds,
            "max_new_tokens": MAX_NEW_TOKENS,
            "threads": args.threads,
            "model": DEFAULT_MODEL_DIR.name,
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
