"""Speed of real exit policies on the embedded default model and real sentences, at batch 1, 4 and 16.

Every policy decodes the same held-out Tatoeba sentences with the model's own exit heads, one
batch at a time, each batch paired with `full` in lockstep (`mee_bench.timing.PairedBlocks`;
docs/TIMING.md says how and why). Reported per policy and batch size: the speedup interval, the
candidate's decoder ms/token in its first timed pass (for scale only: `full`'s comes from an
untimed reference pass, so compare policies by the paired speedup), the average exit layer, decoder
layers computed per token, whether its output equals `full`'s on every sentence (`identical_to_full`), and for
self-speculative policies the acceptance rate and mean accepted draft length. Last, what one
pass through every layer and the head costs over 1, 2, 3, 4 and 8 positions (`width_cost`):
the price of verifying drafts in one pass, or of decoding several rows at once.

    python benchmarks/policy_speed.py [--quick] [--sentences 48] [--batches 1 4 16] [--threads 1]

Writes results/bench/policy_speed.json, which `mee-bench results-page` shows in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import reduce
from itertools import islice
from pathlib import Path

import torch
from bench_io import write_result
from tabulate import tabulate

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TATOEBA_ENFR, TaskSpec
from mee_bench.harness.data import local_split_path, read_jsonl
from mee_bench.paths import DATA_DIR_ENV, DEFAULT_MODEL_DIR
from mee_bench.study.bench_tables import width_line
from mee_bench.timing.load import LoadMonitor
from mee_bench.timing.pairing import PairedBlocks

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 64
WIDTHS = (1, 2, 3, 4, 8)  # positions per pass whose cost `width_costs` measures
POLICIES = {
    "fixed, layer 2": ExitPolicy("fixed", min_exit_layer=2),
    "lstm 0.5, from 2": ExitPolicy("lstm", threshold=0.5, min_exit_layer=2),
    "lstm 0.9, from 4": ExitPolicy("lstm", threshold=0.9, min_exit_layer=4),
    "saturation 0.95, from 4": ExitPolicy("saturation", threshold=0.95, min_exit_layer=4),
    "softmax 0.5, from 2": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2),
    "softmax 0.5, from 2, top-64": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2, vocab_top_k=64),
    "monotonic_heuristic 0.9, from 4": ExitPolicy("monotonic_heuristic", threshold=0.9, min_exit_layer=4),
    "monotonic_heuristic 0.9, from 4, top-64": ExitPolicy(
        "monotonic_heuristic", threshold=0.9, min_exit_layer=4, vocab_top_k=64
    ),
    "self_speculative, draft 2 layers x 1": ExitPolicy(
        "fixed", min_exit_layer=2, decoding="self_speculative", max_draft=1
    ),
    "self_speculative, draft 4 layers x 2": ExitPolicy(
        "fixed", min_exit_layer=4, decoding="self_speculative", max_draft=2
    ),
    "self_speculative, draft 2 layers while lstm >= 0.5 (max 4)": ExitPolicy(
        "lstm", threshold=0.5, min_exit_layer=2, decoding="self_speculative", max_draft=4
    ),
}


def task_prompts(count: int, spec: TaskSpec = TATOEBA_ENFR) -> list[str]:
    """The task prompts of the first `count` distinct source sentences of `spec`'s split (held-out Tatoeba by
    default)."""
    path = local_split_path(spec.dataset, spec.split)
    if path is None:
        raise SystemExit(f"no {spec.dataset}/{spec.split}.jsonl: set {DATA_DIR_ENV} to a data root holding it")
    distinct = dict.fromkeys(spec.prompt(row) for row in read_jsonl(path))
    return list(islice(distinct, count))


def batches_of(
    generator: EarlyExitGenerator, prompts: list[str], batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompts tokenized in batches of `batch` (a last, smaller batch is left out): each a timing block."""
    return [generator.tokenize(prompts[start : start + batch]) for start in range(0, len(prompts) - batch + 1, batch)]


def policy_row(
    name: str,
    policy: ExitPolicy,
    generator: EarlyExitGenerator,
    blocks: list,
    full_outputs: list,
    target_half_width: float,
    allowance_s: float,
    min_repeats: int,
) -> dict:
    early_exit = policy.decoding == "early_exit"
    paired = PairedBlocks(
        # at batch 1 `full` decodes on past its own end until stopped: both cover the policy's positions
        lambda batch: generator.decode_steps(*batch, ExitPolicy("full"), MAX_NEW_TOKENS, until_truncated=early_exit),
        lambda batch: generator.decode_steps(*batch, policy, MAX_NEW_TOKENS),
        target_half_width=target_half_width,
        allowance_s=allowance_s,
        min_repeats=min_repeats,
        sync=torch.cuda.synchronize if generator.runner.device.type == "cuda" else lambda: None,
        units=lambda output: output.stats.tokens,
        lockstep=True,
        # `full` stops where the policy did, step for step; self-speculation writes `full`'s own
        # tokens, several per step, so its baseline runs to its end
        truncate_baseline=early_exit,
    )
    outputs = [paired.run(batch) for batch in blocks]
    speedup = paired.speedup()  # more rounds over the same blocks until precise or out of time
    stats = reduce(lambda a, b: a.merge(b), (out.stats for out in outputs))
    tokens = [row for out in outputs for row in out.tokens]
    timed = len(blocks)
    full_rows = [row for out in full_outputs for row in out.tokens]
    return {
        "policy": name,
        "speedup_vs_full": speedup.format(),
        "verdict": speedup.verdict,
        "ms_per_token": 1e3 * sum(paired.timer.candidate_s[:timed]) / stats.tokens,
        "avg_exit_layer": stats.avg_exit_layer,
        "layers_per_token": stats.layers_per_token,
        "identical_to_full": tokens == full_rows,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_draft": stats.mean_accepted_draft,
        "speedup": speedup.as_dict(),
        "policy_settings": policy.as_dict(),
    }


def width_costs(generator: EarlyExitGenerator, prompt: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of one pass through every decoder layer, and of the LM head, over w positions of one
    sentence, w in WIDTHS, interleaved so that drift hits every width alike. w = 1 is a decoding
    step; w > 1 is what verifying w - 1 drafts in one pass costs (and, to within attention, w rows
    of a batch): the arithmetic behind self-speculation and batches."""
    runner = generator.runner
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    ids, mask = generator.tokenize([prompt])
    cache, _ = runner.start(ids, mask, MAX_NEW_TOKENS)
    states = torch.randn(1, max(WIDTHS), runner.hidden_size, generator=torch.Generator().manual_seed(0))
    states = states.to(runner.device, runner.dtype)
    layers_s: dict[int, list[float]] = {w: [] for w in WIDTHS}
    head_s: dict[int, list[float]] = {w: [] for w in WIDTHS}
    with torch.inference_mode():
        for _ in range(repeats):
            for w in WIDTHS:  # positions 1..w, as a round verifying drafts from step 1 would write
                positions = torch.arange(1, w + 1, device=runner.device)[None] if w > 1 else 1
                hidden = states[:, :w]
                sync()
                started = time.perf_counter()
                for index in range(runner.num_layers):
                    hidden = runner.layer(index, hidden, cache, None, positions, w)
                sync()
                between = time.perf_counter()
                runner.logits(hidden).argmax(-1)
                sync()
                layers_s[w].append(between - started)
                head_s[w].append(time.perf_counter() - between)
    return {
        str(w): {"layers_ms": 1e3 * statistics.median(layers_s[w]), "head_ms": 1e3 * statistics.median(head_s[w])}
        for w in WIDTHS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="8 sentences, batch 1 and 4, loose intervals (a smoke run)"
    )
    parser.add_argument("--sentences", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--target-half-width", type=float, default=0.05, help="relative; timing stops when reached")
    parser.add_argument("--allowance", type=float, default=20.0, help="seconds of extra timing per policy and batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the sweep gives each trial 1)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="a model directory with exit heads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "policy_speed.json")
    args = parser.parse_args(argv)
    sentences, batches, allowance = (8, [1, 4], 0.0) if args.quick else (args.sentences, args.batches, args.allowance)
    torch.set_num_threads(args.threads)

    generator = load_generator(args.model, args.dtype, args.device, require_heads=True)
    prompts = task_prompts(sentences)
    results = []
    with LoadMonitor(threads=args.threads) as load:
        for batch in batches:
            blocks = batches_of(generator, prompts, batch)
            full_outputs = [generator.generate(*block, ExitPolicy("full"), MAX_NEW_TOKENS) for block in blocks]
            full_stats = reduce(lambda a, b: a.merge(b), (out.stats for out in full_outputs))
            rows = [
                {
                    "policy": "full",
                    "speedup_vs_full": "1 (baseline)",
                    "verdict": "baseline",
                    "ms_per_token": 1e3 * full_stats.decoder_s / full_stats.tokens,
                    "avg_exit_layer": full_stats.avg_exit_layer,
                    "layers_per_token": full_stats.layers_per_token,
                    "identical_to_full": True,
                    "acceptance_rate": None,
                    "mean_accepted_draft": None,
                    "speedup": None,
                    "policy_settings": ExitPolicy("full").as_dict(),
                }
            ]
            for name, policy in POLICIES.items():
                generator.generate(*blocks[0], policy, MAX_NEW_TOKENS)  # warm-up
                rows.append(
                    policy_row(
                        name,
                        policy,
                        generator,
                        blocks,
                        full_outputs,
                        args.target_half_width,
                        allowance,
                        2 if args.quick else min(len(blocks), 10),
                    )
                )
                print(f"batch {batch}: {name} done", file=sys.stderr)
            print(f"\nbatch {batch}")
            shown = (
                "policy",
                "speedup_vs_full",
                "ms_per_token",
                "avg_exit_layer",
                "layers_per_token",
                "identical_to_full",
                "acceptance_rate",
                "mean_accepted_draft",
            )
            print(tabulate([[row[k] for k in shown] for row in rows], headers=shown, floatfmt=".2f"))
            results.append({"batch": batch, "policies": rows})
        width_cost = width_costs(generator, prompts[0], 10 if args.quick else 100)
        print(width_line(width_cost))

    result = {
        "batches": results,
        "width_cost": width_cost,
        "load": load.report(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {}),
        },
        "settings": {
            "model": args.model.name,
            "device": args.device,
            "task": TATOEBA_ENFR.name,
            "sentences": sentences,
            "timing": "paired blocks with full, ratio of ms/token over all blocks, 95% timing-noise interval",
            "target_half_width": args.target_half_width,
            "allowance_s": allowance,
            "max_new_tokens": MAX_NEW_TOKENS,
            "dtype": args.dtype,
        },
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
