"""Where the time of one training step goes: torch.profiler over real steps of a training preset.

Each objective trains its own copy of the preset's model on the same real batches; the step
is cut into phases (collate, the layers' forward, the per-layer LM heads with their
cross-entropies and in-forward gradients, the backward through the layers, clipping and the
optimiser), and aten operators are grouped into kinds (matrix products, attention, norms,
softmax / cross-entropy, elementwise, copies and fills). The training changes of
docs/TRAINING.md were chosen from these tables.

    python benchmarks/train_profile.py [--preset default] [--steps 4] [--objectives final weighted_ce]
Writes results/bench/train_profile.json and the generated page docs/train_profile.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from bench_io import write_result
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile, record_function
from train_speed import preset_batches

from mee_bench.engine.runner import build_runner
from mee_bench.paths import REPO_ROOT
from mee_bench.provenance import hardware_info
from mee_bench.train.config import load_config
from mee_bench.train.loop import autocast, build_model, build_optimizer, make_objective, resolve_precision
from mee_bench.train.objectives import decoder_layer_states

OUTPUT = REPO_ROOT / "results" / "bench" / "train_profile.json"
PAGE = REPO_ROOT / "docs" / "train_profile.md"
PHASES = ("data", "forward", "heads_ce", "backward", "optimizer")
# aten operator name fragments -> the kind of work they are (first match wins).
KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (sdpa)", ("scaled_dot_product", "_flash_attention")),
    ("softmax / cross-entropy", ("softmax", "logsumexp", "nll_loss", "cross_entropy", "gather", "scatter")),
    ("norms (pow, mean, rsqrt)", ("aten::pow", "aten::mean", "aten::rsqrt")),
    ("fills and copies", ("aten::fill_", "aten::zero_", "aten::copy_", "aten::clone", "aten::index")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::tanh", "aten::gelu", "aten::neg")),
    ("optimiser kernels", ("_fused_adamw", "_foreach")),
)


def profiled_step(model, runner, objective, optimizer, make_batch, cfg, step: int) -> None:
    with record_function("phase:data"):
        batch = make_batch()
    with autocast(cfg):
        with record_function("phase:forward"):
            states = decoder_layer_states(runner, batch)
        with record_function("phase:heads_ce"):
            loss, _ = objective(runner, states, batch["labels"], step)
    with record_function("phase:backward"):
        loss.backward()
    with record_function("phase:optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def kind_of(name: str) -> str | None:
    for kind, fragments in KINDS:
        if any(fragment in name for fragment in fragments):
            return kind
    return None


def profile_objective(cfg, tokenizer, mixture, batches, steps: int) -> dict:
    model = build_model(cfg, tokenizer).train()
    runner, objective, optimizer = build_runner(model), make_objective(cfg), build_optimizer(cfg, model)
    pad = tokenizer.pad_token_id
    for index in batches[:2]:  # warm-up steps: allocator and kernels
        profiled_step(model, runner, objective, optimizer, lambda i=index: mixture.collate(i, 0, pad), cfg, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step, index in enumerate(batches[2 : steps + 2], 2):
            profiled_step(model, runner, objective, optimizer, lambda i=index: mixture.collate(i, 0, pad), cfg, step)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    phases = {p: 0.0 for p in PHASES}
    kinds: dict[str, float] = defaultdict(float)
    for event in events:
        if event.key.startswith("phase:"):
            phases[event.key.removeprefix("phase:")] = event.cpu_time_total / 1e6 / steps
        kind = kind_of(event.key)
        if kind and event.key.startswith("aten::"):
            kinds[kind] += event.self_cpu_time_total / 1e6 / steps
    total_self = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6 / steps
    kinds["other aten operators"] = max(0.0, total_self - sum(kinds.values()))
    return {"s_per_step": round(wall / steps, 3), "phases_s": rounded(phases), "kinds_s": rounded(kinds)}


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in values.items()}


def share_table(result: dict, key: str, labels: dict[str, str] | None = None) -> str:
    names = list(result["objectives"])
    rows = []
    keys = list(dict.fromkeys(k for o in names for k in result["objectives"][o][key]))
    for item in keys:
        row = [labels.get(item, item) if labels else item]
        for name in names:
            entry = result["objectives"][name]
            seconds = entry[key].get(item, 0.0)
            row.append(f"{seconds:.3f} s ({100 * seconds / entry['s_per_step']:.0f}%)")
        rows.append(row)
    return tabulate(rows, headers=["", *names], tablefmt="github")


PHASE_LABELS = {
    "data": "collate the batch",
    "forward": "encoder + decoder forward (all layers' states)",
    "heads_ce": "per-layer final norm, LM head, CE and its gradient",
    "backward": "backward through the layers",
    "optimizer": "gradient clipping + fused AdamW",
}


def write_page(result: dict, command: str) -> None:
    lines = [
        "# Where a training step's time goes",
        "",
        f"<!-- generated by `{command}`; do not edit by hand -->",
        f"Preset `{result['preset']}` ({result['precision']}, {result['threads']} threads), "
        f"{result['steps']} profiled steps per objective on the same real batches; {result['machine']}; "
        f"{result['date']}. Objectives: " + "; ".join(f"`{k}`: {v}" for k, v in result["descriptions"].items()) + ".",
        "",
        "Seconds per step by phase (a phase's time includes the operators it calls):",
        "",
        share_table(result, "phases_s", PHASE_LABELS),
        "",
        "Seconds per step by kind of operator (self time of aten operators, all phases):",
        "",
        share_table(result, "kinds_s"),
        "",
        "Why the training path looks as it does: [TRAINING.md](TRAINING.md).",
        "",
    ]
    PAGE.write_text("\n".join(lines))
    print(f"-> {PAGE}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--objective",
        nargs=2,
        action="append",
        metavar=("LABEL", "OVERRIDES"),
        help="a labelled objective as comma-separated overrides (repeatable); default: the preset with "
        "objective.name=final, =weighted_ce and weighted_ce with the preset's shallow_token_fraction=1.0",
    )
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--no-page", action="store_true", help="do not rewrite docs/train_profile.md")
    args = parser.parse_args()
    objectives = args.objective or [
        ["final", "objective.name=final"],
        ["weighted_ce (all positions)", "objective.name=weighted_ce,objective.shallow_token_fraction=1.0"],
        ["weighted_ce (sampled)", "objective.name=weighted_ce,objective.shallow_token_fraction=0.25"],
    ]
    torch.set_num_threads(args.threads)
    cfg, choice = resolve_precision(load_config(args.preset, [f"threads={args.threads}"]))
    tokenizer, mixture, batches, _ = preset_batches(cfg, args.steps + 2)
    machine = f"{hardware_info(args.threads)['cpu_model']} ({torch.backends.cpu.get_cpu_capability()})"
    result = {
        "preset": args.preset,
        "threads": args.threads,
        "steps": args.steps,
        "precision": choice.precision,
        "precision_reason": choice.reason,
        "machine": machine,
        "date": date.today().isoformat(),
        "descriptions": {},
        "objectives": {},
    }
    for label, overrides in objectives:
        cfg_o = load_config(
            args.preset, [f"threads={args.threads}", f"precision={choice.precision}", *overrides.split(",")]
        )
        result["descriptions"][label] = overrides.replace(",", ", ")
        result["objectives"][label] = profile_objective(cfg_o, tokenizer, mixture, batches, args.steps)
        print(label, result["objectives"][label])
    write_result(args.out, result)
    if not args.no_page:
        write_page(result, "python benchmarks/train_profile.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
