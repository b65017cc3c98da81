"""Which rounded copy of the LM head a pruned check's first read should use, timed in the loop.

A token's first vocabulary-pruned check ranks the whole vocabulary through
`runner.approximate_logits`: an int8 copy of the head on a CPU with x86 int8 kernels, else a
float16 one. A head read timed alone misleads here (in the loop the layers evict the head between
reads, and the two kernels' fixed costs differ), so this times the decoding loop itself: `softmax`
with `vocab_top_k` 64 checking every layer and never exiting (both variants do the same work and
emit `full`'s tokens), with the int8 first read against the float16 one, paired and interleaved,
and each against `full`. Random-weight models of the t5-small shape (a 32k x 512 head) and of the
embedded default model's shape (8k x 256), float32, batch 1, 24 prompt and 32 new tokens.

    python benchmarks/first_read.py [--shapes t5-small,default] [--threads 1]
    python benchmarks/first_read.py --tiny        (a seconds-long smoke run)

Writes results/bench/first_read.json.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from bench_io import write_result
from tabulate import tabulate

import mee_bench.engine.runner as runner_module
from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.policy import ExitPolicy
from mee_bench.timing.pairing import time_paired

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import PRUNED_TOP_K, SHAPES, default_shape, random_model, width  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def int8_engines(engines: tuple[str, ...]) -> Iterator[None]:
    """Run with `engines` as the quantized engines that get the int8 copy (() forces float16)."""
    saved = runner_module.INT8_ENGINES
    runner_module.INT8_ENGINES = engines
    try:
        yield
    finally:
        runner_module.INT8_ENGINES = saved


def decoders(generator: EarlyExitGenerator, new_tokens: int) -> dict[str, Callable[[], list[list[int]]]]:
    """`full`, and never-exiting pruned `softmax` with each first read, on one seeded prompt."""
    vocab = generator.model.config.vocab_size
    ids = torch.randint(1, min(1000, vocab), (1, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    never = ExitPolicy("softmax", threshold=1.0, min_exit_layer=1, vocab_top_k=PRUNED_TOP_K)

    def decode(policy: ExitPolicy, engines: tuple[str, ...]) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            with int8_engines(engines):
                return generator.generate(ids, mask, policy, new_tokens).tokens

        return run

    return {
        "full": decode(ExitPolicy("full"), runner_module.INT8_ENGINES),
        "int8": decode(never, runner_module.INT8_ENGINES),
        "float16": decode(never, ()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="t5-small,default", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds per comparison before re-timing")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, 4 tokens, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "first_read.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["tiny"] if args.tiny else [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; use some of {', '.join(SHAPES)}")
    new_tokens, rounds, allowance = (4, 2, 0.5) if args.tiny else (32, args.rounds, 40.0)

    rows = []
    for name in names:
        shape = default_shape() if name == "default" else SHAPES[name]
        runs = decoders(EarlyExitGenerator(random_model(shape, torch.float32, "cpu")), new_tokens)
        outputs = {variant: run() for variant, run in runs.items()}  # warm-up, and the exactness check

        def paired(baseline: str, candidate: str) -> dict:
            pairs = [(runs[baseline], runs[candidate])] * rounds
            return time_paired(pairs, target_half_width=0.01, allowance_s=allowance, min_repeats=rounds).as_dict()

        rows.append(
            {
                "shape": name,
                "head": f"{shape['vocab_size']} x {width(shape)}",
                "int8_vs_float16": paired("float16", "int8"),
                "int8_vs_full": paired("full", "int8"),
                "float16_vs_full": paired("full", "float16"),
                "identical_to_full": outputs["int8"] == outputs["full"] == outputs["float16"],
            }
        )
        print(f"{name}: done", file=sys.stderr)

    def shown(figures: dict) -> str:
        return f"{figures['ratio']:.2f}x [{figures['low']:.2f}, {figures['high']:.2f}]"

    print(
        tabulate(
            [
                [
                    row["shape"],
                    row["head"],
                    shown(row["int8_vs_float16"]),
                    shown(row["int8_vs_full"]),
                    shown(row["float16_vs_full"]),
                    row["identical_to_full"],
                ]
                for row in rows
            ],
            headers=[
                "shape",
                "head",
                "int8 first read vs float16",
                "int8: vs full",
                "float16: vs full",
                "identical to full",
            ],
        )
    )
    result = {
        "shapes": rows,
        "settings": {
            "dtype": "float32",
            "batch": 1,
            "prompt_tokens": 24,
            "new_tokens": new_tokens,
            "policy": f"softmax, threshold 1.0 (never exits), every layer checked, vocab_top_k {PRUNED_TOP_K}",
            "threads": args.threads,
            "rounds": rounds,
            "int8_kernels": torch.backends.quantized.engine in runner_module.INT8_ENGINES,
        },
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
