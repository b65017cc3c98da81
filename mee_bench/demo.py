"""`mee-bench demo`: early exit on a few real sentences, shown token by token.

Runs the `full` policy and an early-exit policy on the same inputs in one process and
prints each generated token with its exit layer, the average exit layer, and the
speedup over `full` measured side by side (never against a number from another run).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from tabulate import tabulate

from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy, read_policy_file, shipped_policy_path
from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.harness.data import local_split_path, read_jsonl
from mee_bench.paths import DEFAULT_MODEL_DIR

FALLBACK_SENTENCES = [
    "Why not start now?",
    "I have a dog and two cats.",
    "The house is wonderful.",
    "Where is the train station?",
]


# Without a shipped policy and without --measure: CALM's softmax measure, which needs no heads.
FALLBACK_POLICY = ExitPolicy("softmax", 0.9, 2)


def demo_sentences(count: int) -> list[str]:
    """Distinct English sources from the held-out Tatoeba validation split when present
    (Tatoeba pairs one English sentence with each of its French translations)."""
    path = local_split_path(TATOEBA_ENFR.dataset, TATOEBA_ENFR.split)
    if path is None:
        return FALLBACK_SENTENCES[:count]
    sentences: dict[str, None] = {}
    for row in read_jsonl(path):
        sentences.setdefault(row["translation"]["en"])
        if len(sentences) == count:
            break
    return list(sentences)


def choose_policy(args: argparse.Namespace) -> tuple[ExitPolicy, str]:
    """--measure if given; else the model's shipped exit_policy.json; else softmax 0.9 from layer 2.
    --threshold, --min-exit-layer and --kv-strategy adjust whichever is chosen."""
    adjust = {
        k: v
        for k, v in (
            ("threshold", args.threshold),
            ("min_exit_layer", args.min_exit_layer),
            ("kv_strategy", args.kv_strategy),
        )
        if v is not None
    }
    if args.measure:
        return ExitPolicy(**{"measure": args.measure, **adjust}), "--measure"
    local = Path(args.pretrained).expanduser()
    shipped = shipped_policy_path(local if local.is_dir() else None)
    if shipped is not None:
        return dataclasses.replace(read_policy_file(shipped)[0], **adjust), f"the model's shipped policy {shipped}"
    return dataclasses.replace(FALLBACK_POLICY, **adjust), "the fallback (no exit_policy.json beside the model)"


def timed_generate(generator, prompts, policy, max_new_tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        texts, out = generator.generate_text(prompts, policy, max_new_tokens)
        best = min(best, time.perf_counter() - started)
    return texts, out, best


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mee-bench demo", description=__doc__)
    parser.add_argument("--pretrained", default=str(DEFAULT_MODEL_DIR), help="model directory or hub id")
    parser.add_argument(
        "--measure", help="default: the model's shipped exit_policy.json, else softmax 0.9 from layer 2"
    )
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--min-exit-layer", type=int)
    parser.add_argument("--kv-strategy", choices=["copy", "deferred"])
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timing repetitions (the best run counts)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    policy, source = choose_policy(args)
    generator = load_generator(args.pretrained, args.dtype, args.device, require_heads=policy.needs_heads)
    tokenizer = generator.tokenizer
    sentences = demo_sentences(args.sentences)
    prompt = TATOEBA_ENFR.prompt if generator.runner.is_encoder_decoder else TATOEBA_ENFR.causal_prompt
    prompts = [prompt({"translation": {"en": sentence}}) for sentence in sentences]

    generator.generate_text(prompts[:1], ExitPolicy("full"), args.max_new_tokens)  # warm-up, untimed
    full_texts, full_out, full_s = timed_generate(
        generator, prompts, ExitPolicy("full"), args.max_new_tokens, args.repeats
    )
    texts, out, exit_s = timed_generate(generator, prompts, policy, args.max_new_tokens, args.repeats)

    print(f"model: {args.pretrained} ({generator.num_layers} decoder layers)")
    print(
        f"policy (from {source}): {policy.measure}, threshold {policy.threshold}, "
        f"min exit layer {policy.min_exit_layer}, {policy.kv_strategy}\n"
    )
    first = out.tokens[0]
    print(f"source: {prompts[0]}")
    rows = [
        (tokenizer.convert_ids_to_tokens(tok), layer, f"{conf:.3f}")
        for tok, layer, conf in zip(first, out.exit_layers[0], out.confidences[0])
    ]
    print(tabulate(rows, headers=["token", "exit layer", "confidence"]))
    print()
    summary = [
        (sentence, full, early, f"{sum(layers) / len(layers):.2f}")
        for sentence, full, early, layers in zip(sentences, full_texts, texts, out.exit_layers)
    ]
    print(tabulate(summary, headers=["source", "full", policy.measure, "avg exit layer"]))
    same = sum(a == b for a, b in zip(full_texts, texts))
    print(
        f"\n{out.stats.tokens} tokens, average exit layer {out.stats.avg_exit_layer:.2f} of {generator.num_layers}; "
        f"outputs identical to full: {same}/{len(prompts)}\n"
        f"wall time (best of {args.repeats}): full {1e3 * full_s:.0f} ms, {policy.measure} {1e3 * exit_s:.0f} ms "
        f"-> speedup {full_s / exit_s:.2f}x (measured side by side in this run)"
    )
    return 0
