"""Does a busy machine move the speedup? The same process, a CPU hog on and off round by round.

A quickstart run beside a hog (`make quickstart-busy`) is compared with an idle run taken at
another time, so what differs between them is the hog and whatever else changed on the
machine in between (on a shared host, other tenants). This benchmark takes the hog alone:
each round decodes the same sentences with every policy paired with `full` in lockstep, as
the sweep does (`full` over exactly the positions the policy generated), once while
`cpu_hog.py` holds the other core and once without, alternating which condition goes first.
Per policy, the shift is the busy ratio over the idle one, minus one, with a 95% Student's t
interval over rounds; an interval holding 0 means the hog moves that speedup by no measurable
amount. The load monitor's CPU share of other processes in each condition shows that the hog
really ran.

    python benchmarks/busy_check.py [--sentences 16] [--rounds 6] [--task wmt15_enfr_mee] [--policies ...]

Writes results/bench/busy_check.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from bench_io import write_result
from cpu_hog import hog_running
from pairing_check import shift_interval
from policy_speed import REPO, task_prompts
from tabulate import tabulate

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TASKS
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.timing.load import LoadMonitor
from mee_bench.timing.pairing import PairedTimer

POLICIES = {
    "softmax 0.5, from 2": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2),
    "lstm 0.5, from 2": ExitPolicy("lstm", threshold=0.5, min_exit_layer=2),
    "saturation 0.99, from 2 (never exits)": ExitPolicy("saturation", threshold=0.99, min_exit_layer=2),
    "full": ExitPolicy("full"),
}
CONDITIONS = ("busy", "idle")
HOG_VISIBLE_CORES = 0.5  # busy rounds must show at least this much more CPU of other processes than idle ones


def lockstep_ratio(generator: EarlyExitGenerator, encoded: list, policy: ExitPolicy, max_new_tokens: int) -> float:
    """`full`'s ms per generated token over `policy`'s, every sentence paired in lockstep as the sweep pairs it."""
    timer = PairedTimer(lockstep=True, truncate_baseline=True, units=lambda out: out.stats.tokens)
    full = ExitPolicy("full")
    for ids, mask in encoded:  # one sentence per block: `full` decodes on past its own end, as at batch 1 in a sweep
        timer.block(
            lambda: generator.decode_steps(ids, mask, full, max_new_tokens, until_truncated=True),
            lambda: generator.decode_steps(ids, mask, policy, max_new_tokens),
        )
    return timer.speedup().ratio


def busy_rounds(
    generator: EarlyExitGenerator, encoded: list, policies: dict[str, ExitPolicy], rounds: int, max_new_tokens: int
) -> tuple[dict, dict]:
    """Per policy and condition, the speedup of each round; per condition, the other processes'
    CPU (cores) during each round."""
    ratios = {name: {condition: [] for condition in CONDITIONS} for name in policies}
    others = {condition: [] for condition in CONDITIONS}
    for round_index in range(rounds):
        for condition in CONDITIONS[:: 1 if round_index % 2 == 0 else -1]:
            with hog_running() if condition == "busy" else nullcontext(), LoadMonitor() as load:
                for name, policy in policies.items():
                    ratios[name][condition].append(lockstep_ratio(generator, encoded, policy, max_new_tokens))
            others[condition].append(load.other_cores)
    return ratios, others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--task", choices=[spec.name for spec in TASKS], default="wmt15_enfr_mee")
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "busy_check.json")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        raise SystemExit(f"--rounds {args.rounds}: at least 2 rounds are needed for an interval")
    torch.set_num_threads(1)
    spec = next(spec for spec in TASKS if spec.name == args.task)
    generator = load_generator(DEFAULT_MODEL_DIR, "float32", "cpu", require_heads=True)
    encoded = [generator.tokenize([prompt]) for prompt in task_prompts(args.sentences, spec)]
    policies = {name: POLICIES[name] for name in args.policies}
    for policy in policies.values():  # untimed warm-up: heads read, buffers built
        generator.generate(*encoded[0], policy, spec.max_gen_toks)
    ratios, others = busy_rounds(generator, encoded, policies, args.rounds, spec.max_gen_toks)
    hog_cores = float(np.mean(others["busy"]) - np.mean(others["idle"]))
    rows = [
        {
            "policy": name,
            "policy_settings": policy.as_dict(),
            "ratios": ratios[name],
            **{f"mean_{condition}": float(np.mean(ratios[name][condition])) for condition in CONDITIONS},
            **shift_interval(ratios[name]["busy"], ratios[name]["idle"]),
        }
        for name, policy in policies.items()
    ]
    print(
        tabulate(
            [
                [
                    row["policy"],
                    row["mean_busy"],
                    row["mean_idle"],
                    f"{100 * row['shift']:+.1f}%",
                    f"[{100 * row['low']:+.1f}%, {100 * row['high']:+.1f}%]",
                ]
                for row in rows
            ],
            headers=["policy", "busy", "idle", "shift", "95% interval"],
            floatfmt=".3f",
        )
    )
    print(
        f"other processes took {np.mean(others['busy']):.2f} cores in busy rounds, {np.mean(others['idle']):.2f} in "
        "idle ones"
    )
    if hog_cores < HOG_VISIBLE_CORES:
        print(
            f"warning: the hog added only {hog_cores:.2f} cores of load; these rounds did not test a busy machine",
            file=sys.stderr,
        )
    result = {
        "policies": rows,
        "other_processes_cpu_cores": others,
        "hog_cores": hog_cores,
        "hog_visible": hog_cores >= HOG_VISIBLE_CORES,
        "settings": {
            "task": spec.name,
            "sentences": args.sentences,
            "rounds": args.rounds,
            "max_new_tokens": spec.max_gen_toks,
            "threads": 1,
            "model": DEFAULT_MODEL_DIR.name,
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
