"""`precision: auto`: train in bf16 autocast only where this machine multiplies bf16 matrices faster.

The machines this project trains on differ from day to day: a CPU with AVX512-BF16 runs a
bf16 matrix product about twice as fast as fp32, one with AVX2 only emulates it many times
slower. A config cannot know which machine it meets, so a short probe at start-up times
one matrix product of the training's own width in both dtypes and decides; the decision
and its figures go into the training record. Master weights stay fp32 either way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from mee_bench.train.config import PRECISIONS

MIN_GAIN = 1.1  # bf16 must be at least this much faster: a tie is not worth its rounding


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in, and why."""

    precision: str
    reason: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    def record(self) -> dict:
        return asdict(self)


def matmul_gflops(dtype: torch.dtype, device: str, size: tuple[int, int, int], seconds: float) -> float:
    """Sustained GFLOP/s of an [m, k] @ [k, n] product in `dtype`, timed for about `seconds`."""
    m, k, n = size
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    a @ b  # first call: kernel selection, allocation
    synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * m * k * n * count / elapsed / 1e9


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def choose_precision(asked: str, device: str, d_model: int, seconds: float = 0.25) -> PrecisionChoice:
    """`asked` when it is bf16 or fp32; for auto, bf16 when the probe finds it `MIN_GAIN` times faster.

    The probe multiplies a batch-sized [2048, d_model] by a [d_model, 4 * d_model] matrix, the shape
    of a feed-forward layer, in each dtype for `seconds`.
    """
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {asked!r}")
    if asked != "auto":
        return PrecisionChoice(asked, "set in the config")
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return PrecisionChoice("fp32", "this GPU has no bf16 support")
    size = (2048, d_model, 4 * d_model)
    fp32 = matmul_gflops(torch.float32, device, size, seconds)
    bf16 = matmul_gflops(torch.bfloat16, device, size, seconds)
    figures = f"bf16 {bf16:.1f} against fp32 {fp32:.1f} GFLOP/s on a {size[0]}x{size[1]} @ {size[1]}x{size[2]} product"
    if bf16 >= MIN_GAIN * fp32:
        return PrecisionChoice("bf16", f"auto: {figures}", round(fp32, 1), round(bf16, 1))
    return PrecisionChoice("fp32", f"auto: {figures} (bf16 must be {MIN_GAIN}x faster)", round(fp32, 1), round(bf16, 1))
