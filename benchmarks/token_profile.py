"""Where a generated token's time goes, per policy, measured with torch.profiler.

The runner's calls are wrapped in `record_function` ranges (the engine itself carries no
profiling code): decoder layers, the LM head read by a check (full, int8-rounded or
vocabulary-pruned), the head that picks a token (at an exit, the last layer, a draft or a
verification), the measure's own work (its step minus any head it read), and the K/V copy of
skipped layers. What is left of the decoder time is
Python and glue (embedding, indexing, bookkeeping, the profiler's own cost). Batch 1, the
embedded default model, held-out Tatoeba sentences; the policies take turns in rounds over
slices of the sentences, so the machine's drift does not land on one of them.

    python benchmarks/token_profile.py [--sentences 16] [--rounds 4] [--threads 1]

Writes results/bench/token_profile.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile, record_function

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_generator
from mee_bench.engine.measures import ExitMeasure
from mee_bench.engine.policy import ExitPolicy
from mee_bench.paths import DEFAULT_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import write_result
from policy_speed import MAX_NEW_TOKENS, task_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
POLICIES = {
    "full": ExitPolicy("full"),
    "softmax 0.5, from 2": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2),
    "softmax 0.5, from 2, top-64": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2, vocab_top_k=64),
    "monotonic_heuristic 0.9, from 4, top-64": ExitPolicy(
        "monotonic_heuristic", threshold=0.9, min_exit_layer=4, vocab_top_k=64
    ),
    "lstm 0.5, from 2": ExitPolicy("lstm", threshold=0.5, min_exit_layer=2),
    "self_speculative, draft 2 layers x 1": ExitPolicy(
        "fixed", min_exit_layer=2, decoding="self_speculative", max_draft=1
    ),
}
CHECK_HEADS = ("head: check, full", "head: check, int8", "head: check, pruned")
CATEGORIES = ("layers", *CHECK_HEADS, "head: token choice", "measure", "K/V copy")


@contextmanager
def instrumented(generator: EarlyExitGenerator):
    """Wrap the runner's calls and every measure's step in named profiler ranges, then restore them."""
    runner, inside_measure = generator.runner, [False]
    originals = {
        name: getattr(runner, name)
        for name in ("layer", "logits", "approximate_logits", "logits_for", "copy_skipped_kv")
    }

    def ranged(label, fn):
        def call(*args, **kwargs):
            with record_function(label() if callable(label) else label):
                return fn(*args, **kwargs)

        return call

    runner.layer = ranged("layers", originals["layer"])
    runner.logits = ranged(
        lambda: "head: check, full" if inside_measure[0] else "head: token choice", originals["logits"]
    )
    runner.approximate_logits = ranged("head: check, int8", originals["approximate_logits"])
    runner.logits_for = ranged("head: check, pruned", originals["logits_for"])
    runner.copy_skipped_kv = ranged("K/V copy", originals["copy_skipped_kv"])
    measure_classes = [cls for cls in _subclasses(ExitMeasure) if "step" in vars(cls)]
    steps = {cls: vars(cls)["step"] for cls in measure_classes}

    def wrap(fn):
        def measured(self, *args):
            inside_measure[0] = True
            try:
                with record_function("measure+"):
                    return fn(self, *args)
            finally:
                inside_measure[0] = False

        return measured

    for cls, fn in steps.items():
        cls.step = wrap(fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(runner, name, fn)
        for cls, fn in steps.items():
            cls.step = fn


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def profile_chunk(generator: EarlyExitGenerator, inputs: list[torch.Tensor], policy: ExitPolicy) -> Counter:
    """Profiled decoding of `inputs`: inclusive microseconds per range, and the tokens and decoder
    seconds the engine counted."""
    totals: Counter = Counter()
    with instrumented(generator), profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids in inputs:
            out = generator.generate(ids, None, policy, MAX_NEW_TOKENS)
            totals["tokens"] += out.stats.tokens
            totals["decoder_s"] += out.stats.decoder_s
    for event in prof.key_averages():
        totals[event.key] += event.cpu_time_total
    return totals


def breakdown(totals: Counter) -> dict:
    """Milliseconds per token by category; what no range covers is Python and glue."""
    tokens = totals["tokens"]
    per_token = {name: totals[name] / 1e3 / tokens for name in CATEGORIES}
    nested_heads = sum(per_token[name] for name in CHECK_HEADS)
    per_token["measure"] = max(totals["measure+"] / 1e3 / tokens - nested_heads, 0.0)
    total = 1e3 * totals["decoder_s"] / tokens
    per_token["python and glue"] = total - sum(per_token.values())
    return {
        "decoder_ms_per_token": total,
        "ms_per_token": per_token,
        "share": {name: value / total for name, value in per_token.items()},
        "tokens": tokens,
    }


def profile_interleaved(generator: EarlyExitGenerator, inputs: list[torch.Tensor], rounds: int) -> dict[str, dict]:
    """Every policy profiled on the same sentences, in `rounds` rounds of a slice each, the policies'
    order rotating between rounds: the machine's drift spreads over all policies instead of landing
    on whichever ran last."""
    names = list(POLICIES)
    for name in names:
        for ids in inputs[:2]:
            generator.generate(ids, None, POLICIES[name], MAX_NEW_TOKENS)  # warm-up
    totals = {name: Counter() for name in names}
    for round_index in range(rounds):
        chunk = inputs[round_index::rounds]
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            totals[name] += profile_chunk(generator, chunk, POLICIES[name])
    return {name: breakdown(totals[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds, each a slice of the sentences")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "token_profile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = load_generator(DEFAULT_MODEL_DIR, require_heads=True)
    inputs = [generator.tokenize([prompt])[0] for prompt in task_prompts(args.sentences)]
    rounds = min(args.rounds, len(inputs))
    results = profile_interleaved(generator, inputs, rounds)
    columns = [*CATEGORIES, "python and glue"]
    table = [[name, r["decoder_ms_per_token"], *(r["ms_per_token"][c] for c in columns)] for name, r in results.items()]
    print("decoder ms per token, by where it goes (profiled, batch 1):")
    print(tabulate(table, headers=["policy", "total", *columns], floatfmt=".2f"))
    write_result(
        args.out,
        {
            "policies": results,
            "settings": {
                "model": DEFAULT_MODEL_DIR.name,
                "sentences": args.sentences,
                "rounds": rounds,
                "batch": 1,
                "threads": torch.get_num_threads(),
                "max_new_tokens": MAX_NEW_TOKENS,
                "note": "profiler ranges add their own cost, counted in python and glue",
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
