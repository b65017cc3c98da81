"""Decode speed of the early-exit engine, measured side by side in one run.

Random-weight models (speed does not depend on training): a t5-small shape (d_model 512,
6+6 layers, vocab 32128) and the embedded default model's shape. For each dtype and batch
size it times Hugging Face's `generate`, our `full` policy and forced exits (`fixed` at
layers 2 and 4), interleaving repetitions so machine noise hits all variants alike, and
reports medians. Then the per-check overhead of every measure: the measure runs at every
layer with a threshold it never reaches, and its extra time per check (fastest of the
repetitions, as the difference is small) is divided by the fastest time of one decoder
layer measured in the same run. The softmax-family measures also run with vocabulary-pruned
checks (`vocab_top_k`): `MEASURE@topK` is their mean cost per check (the token's first check
reads the full head, the later ones k rows of it), `MEASURE@topK_pruned_check` the cost of
one pruned check alone (every layer checked, minus only the last layer checked).

    python benchmarks/decode_speed.py [--quick] [--device cuda] [--large]

Writes results/bench/decode_speed.json (or decode_speed_gpu.json on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import T5Config, T5ForConditionalGeneration

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import ExitHeads
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.engine.policy import ExitPolicy

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6, vocab_size=32128),
    "default": dict(d_model=256, d_kv=64, d_ff=1024, num_heads=4, num_layers=4, num_decoder_layers=6, vocab_size=8192),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24, vocab_size=32128),
}
NEVER = {"softmax": 1.0, "saturation": 1.0, "classifier": 1.0, "lstm": 1.0, "last_three_mlp": 1.0, "monotonic_heuristic": 1.0}
PRUNED_TOP_K = 64
PRUNED = ("softmax", "monotonic_heuristic")


def default_shape() -> dict:
    """The embedded default model's shape when it is there, else its planned shape."""
    config_path = DEFAULT_MODEL_DIR / "config.json"
    if not config_path.is_file():
        return SHAPES["default"]
    config = json.loads(config_path.read_text())
    return {key: config[key] for key in SHAPES["default"]}


def random_model(shape: dict, dtype: torch.dtype, device: str) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(**shape, decoder_start_token_id=0, eos_token_id=None, pad_token_id=0, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).eval().to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None  # every variant generates exactly max_new_tokens
    return model


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(variants: dict, repeats: int, device: str, summary=statistics.median) -> dict[str, float]:
    for fn in variants.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(timed(fn, device))
    return {name: summary(values) for name, values in samples.items()}


def speed_case(name: str, shape: dict, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    model = random_model(shape, dtype, device)
    generator = EarlyExitGenerator(model)
    ids = torch.randint(2, shape["vocab_size"], (batch, 24), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    layers = shape["num_decoder_layers"]
    variants = {"full": lambda: generator.generate(ids, mask, ExitPolicy("full"), new_tokens)}
    if shape["num_layers"] == layers:  # transformers' generate sizes its cache by the encoder depth
        variants["hf_generate"] = lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
    for exit_layer in (2, layers // 2 + 1):
        policy = ExitPolicy("fixed", min_exit_layer=exit_layer)
        variants[f"exit{exit_layer}"] = lambda policy=policy: generator.generate(ids, mask, policy, new_tokens)
    with torch.inference_mode():
        medians = interleaved_medians(variants, repeats, device)
    tokens = batch * new_tokens
    row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "new_tokens": new_tokens}
    row.update({f"{k}_ms_per_token": 1e3 * v / tokens for k, v in medians.items()})
    row["full_vs_hf_generate"] = medians["full"] / medians["hf_generate"] if "hf_generate" in medians else None
    for key in medians:
        if key.startswith("exit"):
            row[f"speedup_{key}_of_{layers}"] = medians["full"] / medians[key]
    return row


def layer_time(generator: EarlyExitGenerator, ids: torch.Tensor, repeats: int, device: str) -> float:
    """Seconds for one decoder layer on one token at a mid-sequence position (batch of `ids`)."""
    runner = generator.runner
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        cache, _ = runner.start(ids, mask, 32)
        hidden = runner.embed(ids[:, :1])
        position = 16

        def all_layers():
            for index in range(runner.num_layers):
                runner.layer(index, hidden, cache, None, position, position)

        return interleaved_medians({"layers": all_layers}, repeats, device, summary=min)["layers"] / runner.num_layers


def overhead_case(name: str, shape: dict, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    model = random_model(shape, dtype, device)
    torch.manual_seed(0)
    heads = ExitHeads(shape["d_model"]).to(device)
    generator = EarlyExitGenerator(model, heads=heads)
    ids = torch.randint(2, shape["vocab_size"], (batch, 24), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    layers = shape["num_decoder_layers"]
    variants = {"full": lambda: generator.generate(ids, mask, ExitPolicy("full"), new_tokens)}
    for measure, threshold in NEVER.items():
        policy = ExitPolicy(measure, threshold=threshold, min_exit_layer=1)
        variants[measure] = lambda policy=policy: generator.generate(ids, mask, policy, new_tokens)
    for measure in PRUNED:
        for first in (1, layers - 1):
            policy = ExitPolicy(measure, threshold=NEVER[measure], min_exit_layer=first, vocab_top_k=PRUNED_TOP_K)
            variants[f"{measure}@top{PRUNED_TOP_K}/{first}"] = lambda policy=policy: generator.generate(ids, mask, policy, new_tokens)
    with torch.inference_mode():
        fastest = interleaved_medians(variants, repeats * 2, device, summary=min)  # a small difference: least noise
    one_layer = layer_time(generator, ids, repeats * 4, device)
    checks = new_tokens * (layers - 1)
    row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "layer_ms": 1e3 * one_layer}
    for measure in NEVER:
        row[measure] = (fastest[measure] - fastest["full"]) / checks / one_layer
    for measure in PRUNED:
        every, last_only = fastest[f"{measure}@top{PRUNED_TOP_K}/1"], fastest[f"{measure}@top{PRUNED_TOP_K}/{layers - 1}"]
        row[f"{measure}@top{PRUNED_TOP_K}"] = (every - fastest["full"]) / checks / one_layer
        # the heuristic reads two layers before its first check, so "last layer only" still reads three
        later_reads = layers - 2 if measure == "softmax" else layers - 4
        row[f"{measure}@top{PRUNED_TOP_K}_pruned_check"] = (every - last_only) / (new_tokens * later_reads) / one_layer
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases (a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="add the t5-large shape (for a GPU)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    repeats, new_tokens = (3, 8) if args.quick else (7, 32)
    shapes = {"t5-small": SHAPES["t5-small"], "default": default_shape()}
    if args.large:
        shapes["t5-large"] = SHAPES["t5-large"]
    dtypes = [torch.float32, torch.bfloat16]
    batches = [1] if args.quick else [1, 8]

    speed_rows = []
    for name, shape in shapes.items():
        for dtype in dtypes:
            for batch in batches:
                row = speed_case(name, shape, dtype, batch, new_tokens, repeats, device)
                speed_rows.append(row)
                print(f"{name} {row['dtype']} bs{batch}: done", file=sys.stderr)
    overhead_rows = [
        overhead_case(name, shape, dtype, 1, new_tokens, repeats, device) for name, shape in shapes.items() for dtype in dtypes
    ]

    print(tabulate(speed_rows, headers="keys", floatfmt=".3f"))
    print()
    print("Per-check overhead of each measure, in decoder layers (target <= 0.10 except softmax-based):")
    print(tabulate(overhead_rows, headers="keys", floatfmt=".3f"))

    headline = next(r for r in speed_rows if r["shape"] == "t5-small" and r["dtype"] == "float32" and r["batch"] == 1)
    headline_overhead = next(r for r in overhead_rows if r["shape"] == "t5-small" and r["dtype"] == "float32")
    result = {
        "full_vs_hf_generate": headline["full_vs_hf_generate"],
        "speedup_exit2_of_6": headline["speedup_exit2_of_6"],
        "measure_overhead_layers": {m: headline_overhead[m] for m in headline_overhead if m in NEVER or "@" in m},
        "targets": {"full_vs_hf_generate": "<= 1.0", "speedup_exit2_of_6": ">= 2.0", "measure_overhead_layers": "<= 0.10 (saturation, classifier, lstm, last_three_mlp); "
                    f"<= 0.15 per pruned check (softmax, monotonic_heuristic @top{PRUNED_TOP_K})"},
        "speed": speed_rows,
        "overhead": overhead_rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "settings": {"repeats": repeats, "new_tokens": new_tokens, "input_tokens": 24},
    }
    out = args.out or REPO / "results" / "bench" / ("decode_speed_gpu.json" if device == "cuda" else "decode_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfull_vs_hf_generate={result['full_vs_hf_generate']:.2f}  speedup_exit2_of_6={result['speedup_exit2_of_6']:.2f}  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
