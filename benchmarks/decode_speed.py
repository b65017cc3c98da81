"""Decode speed of the early-exit engine, measured side by side in one run.

Random-weight models (speed does not depend on training): a t5-small shape (d_model 512, 6+6
layers, vocab 32128), the embedded default model's shape, a Llama-shaped decoder-only model
(hidden 512, 12 layers, 8 heads with 2 K/V heads, vocab 32000), and t5-large's shape with
--large. For each dtype and batch size it times Hugging Face's `generate`, our `full` policy
and forced exits (`fixed` at 1/3 and 2/3 of the decoder depth) with each K/V strategy: `exitN`
copies K/V into the skipped layers (CALM), `exitN_deferred` defers them (FREE), which a forced
exit never catches up on, so it never pays for skipped layers and bounds what an exit at layer
N can gain. Repetitions are interleaved so machine noise hits all variants alike
(CUDA-synchronised on a GPU); medians are reported with paired 95% intervals
(`speedup_exitN[_deferred]_of_L`: `full`'s time over the exit's). Then the per-check overhead
of every measure: the measure runs at every layer with a threshold it never reaches, and its
extra time per check (the median over the rounds of its time minus `full`'s in the same round,
with a 95% bootstrap interval: the difference is small) is divided by the fastest time of one
decoder layer measured in the same run. The softmax-family measures
also run with vocabulary-pruned checks (`vocab_top_k`): `MEASURE@topK` is their mean cost per
check (the token's first check ranks the vocabulary through an int8 copy of the head,
every check reads k rows of it),
`MEASURE@topK_pruned_check` the cost of one pruned check alone (every layer checked, minus
only the last layer checked).

    python benchmarks/decode_speed.py [--quick] [--device cuda] [--large]
    python benchmarks/decode_speed.py --device cuda --shapes t5-small,t5-large --dtypes bfloat16 --batches 1,8,32
    python benchmarks/decode_speed.py --tiny        (a seconds-long smoke run of every code path)

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

import numpy as np
import torch
from tabulate import tabulate
from transformers import AutoModelForCausalLM, LlamaConfig, T5Config, T5ForConditionalGeneration

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.policy import ExitPolicy
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.timing.statistics import speedup_interval

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "t5-small": dict(
        d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6, vocab_size=32128
    ),
    "default": dict(d_model=256, d_kv=64, d_ff=1024, num_heads=4, num_layers=4, num_decoder_layers=6, vocab_size=8192),
    "t5-large": dict(
        d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24, vocab_size=32128
    ),
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=6, num_decoder_layers=6, vocab_size=512),
    "llama": dict(
        family="llama",
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1536,
        vocab_size=32000,
    ),
}
NEVER = {
    "softmax": 1.0,
    "saturation": 1.0,
    "classifier": 1.0,
    "lstm": 1.0,
    "last_three_mlp": 1.0,
    "monotonic_heuristic": 1.0,
}
PRUNED_TOP_K = 64
PRUNED = ("softmax", "monotonic_heuristic")


def default_shape() -> dict:
    """The embedded default model's shape when it is there, else its planned shape."""
    config_path = DEFAULT_MODEL_DIR / "config.json"
    if not config_path.is_file():
        return SHAPES["default"]
    config = json.loads(config_path.read_text())
    return {key: config[key] for key in SHAPES["default"]}


_built: dict[tuple, torch.nn.Module] = {}


def is_decoder_only(shape: dict) -> bool:
    return shape.get("family") == "llama"


def depth(shape: dict) -> int:
    """Decoder layers an exit can happen after."""
    return shape["num_hidden_layers"] if is_decoder_only(shape) else shape["num_decoder_layers"]


def width(shape: dict) -> int:
    return shape["hidden_size"] if is_decoder_only(shape) else shape["d_model"]


def random_model(shape: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Built on the device itself and kept for the next batch size: a t5-large takes tens of seconds to initialise
    on a CPU."""
    key = (tuple(sorted(shape.items())), dtype, device)
    if key not in _built:
        _built.clear()  # one model in memory at a time
        torch.manual_seed(0)
        with torch.device(device):
            if is_decoder_only(shape):
                values = {k: v for k, v in shape.items() if k != "family"}
                config = LlamaConfig(
                    **values, bos_token_id=None, eos_token_id=None, pad_token_id=0, max_position_embeddings=512
                )
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            else:
                config = T5Config(
                    **shape, decoder_start_token_id=0, eos_token_id=None, pad_token_id=0, dropout_rate=0.0
                )
                model = T5ForConditionalGeneration(config)
            model = model.eval().to(dtype=dtype)
        model.generation_config.eos_token_id = None  # every variant generates exactly max_new_tokens
        _built[key] = model
    return _built[key]


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_samples(variants: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Each variant timed `repeats` times after a warm-up, round-robin so drift hits all alike;
    sample i of every variant comes from the same round, so ratios can be paired."""
    for fn in variants.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(timed(fn, device))
    return samples


def interleaved_medians(variants: dict, repeats: int, device: str, summary=statistics.median) -> dict[str, float]:
    return {name: summary(values) for name, values in interleaved_samples(variants, repeats, device).items()}


def paired_ratio(samples: dict[str, list[float]], baseline: str, candidate: str) -> tuple[float, list[float]]:
    """baseline/candidate time over the rounds (the same work each round) and its 95% timing-noise interval."""
    ratio = speedup_interval(samples[baseline], samples[candidate])
    return ratio.ratio, [round(ratio.low, 4), round(ratio.high, 4)]


def forced_exit_layers(layers: int) -> list[int]:
    """Forced exits at 1/3 and 2/3 of the decoder depth (layers 2 and 4 of 6)."""
    return sorted({max(1, round(layers / 3)), max(1, round(2 * layers / 3))})


def speed_case(
    name: str, shape: dict, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int, device: str
) -> dict:
    model = random_model(shape, dtype, device)
    generator = EarlyExitGenerator(model)
    ids = torch.randint(2, shape["vocab_size"], (batch, 24), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    layers = depth(shape)
    variants = {"full": lambda: generator.generate(ids, mask, ExitPolicy("full"), new_tokens)}
    if is_decoder_only(shape) or shape["num_layers"] == layers:  # T5: generate sizes its cache by the encoder depth
        variants["hf_generate"] = lambda: model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    for exit_layer in forced_exit_layers(layers):
        for strategy, suffix in (("copy", ""), ("deferred", "_deferred")):
            policy = ExitPolicy("fixed", min_exit_layer=exit_layer, kv_strategy=strategy)
            variants[f"exit{exit_layer}{suffix}"] = lambda policy=policy: generator.generate(
                ids, mask, policy, new_tokens
            )
    with torch.inference_mode():
        samples = interleaved_samples(variants, repeats, device)
    tokens = batch * new_tokens
    row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "new_tokens": new_tokens}
    row.update({f"{k}_ms_per_token": 1e3 * statistics.median(v) / tokens for k, v in samples.items()})
    row["full_vs_hf_generate"], row["full_vs_hf_generate_ci95"] = (
        paired_ratio(samples, "full", "hf_generate") if "hf_generate" in samples else (None, None)
    )
    for key in samples:
        if key.startswith("exit"):
            row[f"speedup_{key}_of_{layers}"], row[f"speedup_{key}_of_{layers}_ci95"] = paired_ratio(
                samples, "full", key
            )
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


def overhead_case(
    name: str, shape: dict, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int, device: str
) -> dict:
    model = random_model(shape, dtype, device)
    torch.manual_seed(0)
    heads = ExitHeads(width(shape)).to(device)
    generator = EarlyExitGenerator(model, heads=heads)
    ids = torch.randint(2, shape["vocab_size"], (batch, 24), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    layers = depth(shape)
    variants = {"full": lambda: generator.generate(ids, mask, ExitPolicy("full"), new_tokens)}
    for measure, threshold in NEVER.items():
        policy = ExitPolicy(measure, threshold=threshold, min_exit_layer=1)
        variants[measure] = lambda policy=policy: generator.generate(ids, mask, policy, new_tokens)
    for measure in PRUNED:
        for first in (1, layers - 1):
            policy = ExitPolicy(measure, threshold=NEVER[measure], min_exit_layer=first, vocab_top_k=PRUNED_TOP_K)
            variants[f"{measure}@top{PRUNED_TOP_K}/{first}"] = lambda policy=policy: generator.generate(
                ids, mask, policy, new_tokens
            )
    with torch.inference_mode():
        samples = {
            name: np.asarray(times) for name, times in interleaved_samples(variants, repeats * 2, device).items()
        }
    one_layer = layer_time(generator, ids, repeats * 4, device)
    checks = new_tokens * (layers - 1)
    row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "layer_ms": 1e3 * one_layer}

    def per_check(extra: np.ndarray, count: int, key: str) -> None:
        """The median of the rounds' paired extra times per check, in layers, and its 95% interval."""
        value, low, high = median_interval(extra / count / one_layer)
        row[key], row[f"{key}_ci95"] = value, [round(low, 3), round(high, 3)]

    for measure in NEVER:
        per_check(samples[measure] - samples["full"], checks, measure)
    for measure in PRUNED:
        every, last_only = (
            samples[f"{measure}@top{PRUNED_TOP_K}/1"],
            samples[f"{measure}@top{PRUNED_TOP_K}/{layers - 1}"],
        )
        per_check(every - samples["full"], checks, f"{measure}@top{PRUNED_TOP_K}")
        # below its threshold the heuristic reads only layers that could still start an exit's three:
        # 1..L-3 when checking from layer 1, one layer when checking from the last
        later_reads = layers - 2 if measure == "softmax" else layers - 4
        per_check(every - last_only, new_tokens * later_reads, f"{measure}@top{PRUNED_TOP_K}_pruned_check")
    return row


def median_interval(values: np.ndarray) -> tuple[float, float, float]:
    """The median and its 95% percentile-bootstrap interval (seeded): a check's cost is a small
    difference of two noisy times, so it is reported with how far the noise could move it."""
    from scipy import stats

    result = stats.bootstrap((values,), np.median, confidence_level=0.95, method="percentile", random_state=0)
    return float(np.median(values)), float(result.confidence_interval.low), float(result.confidence_interval.high)


def _names(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def headline_row(rows: list[dict]) -> dict:
    """The t5-small row at batch 1 (fp32 when measured), else the first row."""
    small = [r for r in rows if r["shape"] == "t5-small" and r["batch"] == 1]
    return next((r for r in small if r["dtype"] == "float32"), small[0] if small else rows[0])


def machine(device: str) -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cuda": torch.version.cuda if device == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases (a smoke run)")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny shape, 2 repetitions, 4 tokens: exercises every path in seconds"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="add the t5-large shape (for a GPU)")
    parser.add_argument("--shapes", type=_names, default=None, help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", type=_names, default=["float32", "bfloat16"], help="comma-separated")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in _names(text)], default=None, help="e.g. 1,8,32")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 7, --quick 3)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    repeats, new_tokens = (3, 8) if args.quick else (7, 32)
    if args.tiny:
        repeats, new_tokens = 2, 4
    repeats = args.repeats or repeats
    names = args.shapes or (
        ["tiny"] if args.tiny else ["t5-small", "default", "llama"] + (["t5-large"] if args.large else [])
    )
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; use some of {', '.join(SHAPES)}")
    shapes = {name: default_shape() if name == "default" else SHAPES[name] for name in names}
    dtypes = [getattr(torch, name) for name in args.dtypes]
    batches = args.batches or ([1] if args.quick or args.tiny else [1, 8])

    speed_rows = []
    for name, shape in shapes.items():
        for dtype in dtypes:
            for batch in batches:
                row = speed_case(name, shape, dtype, batch, new_tokens, repeats, device)
                speed_rows.append(row)
                print(f"{name} {row['dtype']} bs{batch}: done", file=sys.stderr)
    overhead_rows = [
        overhead_case(name, shape, dtype, 1, new_tokens, repeats, device)
        for name, shape in shapes.items()
        for dtype in dtypes
    ]

    print(tabulate(speed_rows, headers="keys", floatfmt=".3f"))
    print()
    print("Per-check overhead of each measure, in decoder layers (target <= 0.10 except softmax-based):")
    print(tabulate(overhead_rows, headers="keys", floatfmt=".3f"))

    headline = headline_row(speed_rows)
    headline_overhead = next(
        r for r in overhead_rows if r["shape"] == headline["shape"] and r["dtype"] == headline["dtype"]
    )
    result = {
        "full_vs_hf_generate": headline["full_vs_hf_generate"],
        "speedup_exit2_of_6": headline.get("speedup_exit2_of_6"),
        "headline": {"shape": headline["shape"], "dtype": headline["dtype"], "batch": headline["batch"]},
        "llama": {
            f"{r['dtype']}_bs{r['batch']}": {
                key: value for key, value in r.items() if "speedup" in key or "hf_generate" in key
            }
            for r in speed_rows
            if r["shape"] == "llama"
        },
        "measure_overhead_layers": {
            m: headline_overhead[m] for m in headline_overhead if m.removesuffix("_ci95") in NEVER or "@" in m
        },
        "targets": {
            "full_vs_hf_generate": "<= 1.0",
            "speedup_exit2_of_6": ">= 2.0",
            "measure_overhead_layers": "<= 0.10 (saturation, classifier, lstm, last_three_mlp); "
            f"<= 0.15 per pruned check (softmax, monotonic_heuristic @top{PRUNED_TOP_K})",
            "llama": "full_vs_hf_generate <= 1.0 per dtype and batch; a forced exit at 1/3 of the depth >= 1.8x at "
            "batch 1 "
            "(copy; deferred, which never pays for skipped layers, at least as fast)",
        },
        "speed": speed_rows,
        "overhead": overhead_rows,
        "machine": machine(device),
        "settings": {"repeats": repeats, "warmup": 1, "new_tokens": new_tokens, "input_tokens": 24},
    }
    out = args.out or REPO / "results" / "bench" / (
        "decode_speed_gpu.json" if device == "cuda" else "decode_speed.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    figures = {key: result[key] for key in ("full_vs_hf_generate", "speedup_exit2_of_6") if result[key] is not None}
    print("\n" + "  ".join(f"{key}={value:.2f}" for key, value in figures.items()) + f"  -> {out}")
    for case, figures in result["llama"].items():
        print(f"llama {case}: " + "  ".join(f"{key}={value}" for key, value in figures.items() if value is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
