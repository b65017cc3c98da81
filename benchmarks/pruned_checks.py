"""What vocabulary-pruned checks cost in decisions and quality, on the held-out Tatoeba slice.

Each softmax-family policy decodes the same distinct English sentences with full-vocabulary
checks and with `vocab_top_k` = k (the token's first check ranks the vocabulary through a
int8 copy of the head and keeps its k best ids; every check of that token reads those
k rows only). Reported per policy and k:

- decisions: the share of exit decisions (the exit layer of a token) that differ from the
  unpruned policy's, counted over each sentence's tokens up to the first token where the two
  outputs differ (after that the contexts differ and the comparison means nothing);
- identical outputs: the share of sentences decoded to the same tokens;
- quality: corpus BLEU and chrF (sacrebleu) against the first reference, and their deltas;
- average exit layer with and without pruning.

    python benchmarks/pruned_checks.py [--sentences 400] [--batch 16] [--top-k 16 64]

Writes results/bench/pruned_checks.json. Speed is not measured here (see decode_speed.py and
policy_speed.py, which time pruned checks side by side with paired intervals).
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

import sacrebleu
import torch
from bench_io import write_result
from tabulate import tabulate

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_generator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.harness.data import local_split_path, read_jsonl
from mee_bench.paths import DATA_DIR_ENV, DEFAULT_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent
POLICIES = {
    "softmax 0.5, from 2": ExitPolicy("softmax", threshold=0.5, min_exit_layer=2),
    "softmax 0.9, from 2": ExitPolicy("softmax", threshold=0.9, min_exit_layer=2),
    "monotonic_heuristic 0.9, from 4": ExitPolicy("monotonic_heuristic", threshold=0.9, min_exit_layer=4),
}


def tatoeba_pairs(count: int) -> list[tuple[str, str]]:
    """(prompt, first reference) of the first `count` distinct English sentences of the held-out split."""
    path = local_split_path(TATOEBA_ENFR.dataset, TATOEBA_ENFR.split)
    if path is None:
        raise SystemExit(
            f"no {TATOEBA_ENFR.dataset}/{TATOEBA_ENFR.split}.jsonl: set {DATA_DIR_ENV} to a data root holding it"
        )
    pairs: dict[str, str] = {}
    for row in read_jsonl(path):
        pairs.setdefault(TATOEBA_ENFR.prompt(row), TATOEBA_ENFR.target(row))
    return list(islice(pairs.items(), count))


def decode(
    generator: EarlyExitGenerator, prompts: list[str], policy: ExitPolicy, batch: int
) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Texts, tokens and exit layers of every prompt, `batch` prompts per call."""
    texts, tokens, layers = [], [], []
    for start in range(0, len(prompts), batch):
        out_texts, out = generator.generate_text(prompts[start : start + batch], policy, TATOEBA_ENFR.max_gen_toks)
        texts += out_texts
        tokens += out.tokens
        layers += out.exit_layers
    return texts, tokens, layers


def differing_decisions(
    base_tokens: list[list[int]], base_layers: list[list[int]], tokens: list[list[int]], layers: list[list[int]]
) -> tuple[int, int]:
    """(differing exit decisions, compared decisions) over each sentence's shared prefix: a token's
    decision is compared while every earlier token agrees (the same context)."""
    differing = compared = 0
    for base_row, base_exits, row, exits in zip(base_tokens, base_layers, tokens, layers):
        for base_token, base_exit, token, exit_layer in zip(base_row, base_exits, row, exits):
            compared += 1
            differing += base_exit != exit_layer
            if base_token != token:
                break
    return differing, compared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "pruned_checks.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    generator = load_generator(DEFAULT_MODEL_DIR, require_heads=False)
    pairs = tatoeba_pairs(args.sentences)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]

    def quality(texts: list[str]) -> tuple[float, float]:
        return sacrebleu.corpus_bleu(texts, [references]).score, sacrebleu.corpus_chrf(texts, [references]).score

    rows = []
    for name, policy in POLICIES.items():
        base_texts, base_tokens, base_layers = decode(generator, prompts, policy, args.batch)
        base_bleu, base_chrf = quality(base_texts)
        for k in args.top_k:
            pruned = ExitPolicy(**{**policy.as_dict(), "vocab_top_k": k})
            texts, tokens, layers = decode(generator, prompts, pruned, args.batch)
            bleu, chrf = quality(texts)
            differing, compared = differing_decisions(base_tokens, base_layers, tokens, layers)
            rows.append(
                {
                    "policy": name,
                    "vocab_top_k": k,
                    "decisions_differing": differing / compared,
                    "decisions_compared": compared,
                    "identical_outputs": sum(a == b for a, b in zip(base_tokens, tokens)) / len(prompts),
                    "bleu_unpruned": base_bleu,
                    "bleu_delta": bleu - base_bleu,
                    "chrf_delta": chrf - base_chrf,
                    "avg_exit_layer_unpruned": sum(map(sum, base_layers)) / sum(map(len, base_layers)),
                    "avg_exit_layer": sum(map(sum, layers)) / sum(map(len, layers)),
                }
            )
            print(f"{name} top-{k}: done", file=sys.stderr)
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    result = {
        "policies": rows,
        "settings": {
            "model": DEFAULT_MODEL_DIR.name,
            "task": TATOEBA_ENFR.name,
            "split": TATOEBA_ENFR.split,
            "sentences": len(prompts),
            "batch": args.batch,
            "max_new_tokens": TATOEBA_ENFR.max_gen_toks,
            "reference": "first reference per distinct English sentence",
            "dtype": "float32",
        },
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
