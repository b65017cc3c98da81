"""`batch_size=auto` and `auto:N` for the `mee` adapter, read as lm-eval's `hf` model reads them.

On a GPU, the largest batch that fits is found as `hf` finds it: try `max_batch_size` (lm-eval's
`--max_batch_size`, default 64) and halve on an out-of-memory error, probing with the longest
request first (requests run longest first, so later ones fit at least as many). `auto:N` detects
again N times as the sorted requests grow shorter; a bucket after one that reached
`max_batch_size` keeps it. The probe decodes a few steps with the whole cache of the request's
generation allocated, so the batch that fits the probe fits the run.

On a CPU there is nothing to probe: memory runs out by swapping or the OOM killer, not by an
error a probe can catch, so `auto` runs the adapter's default batch size (at most
`max_batch_size`) and says so.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 64  # lm-eval's --max_batch_size default
CPU_AUTO_BATCH_SIZE = 8  # the adapter's default batch size
PROBED_DEVICES = ("cuda",)  # where running out of memory is an error a probe can catch


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure a smaller batch may avoid (CUDA's, or a backend's "out of memory")."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def largest_fitting(try_batch: Callable[[int], None], start: int) -> int:
    """The largest batch size, from `start` halving, for which `try_batch` raises no out-of-memory
    error; 1 when none does (the run then fails on its own, with its own error)."""
    size = start
    while size > 1:
        try:
            try_batch(size)
            return size
        except Exception as err:  # noqa: BLE001  (only out-of-memory errors are caught; the rest re-raised)
            if not is_out_of_memory(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size //= 2
    return 1


@dataclass
class BatchSize:
    """A fixed batch size, or `auto` with its number of detections over a run's sorted requests."""

    fixed: int | None
    detections: int = 1  # auto:N
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    chosen: dict[int, int] = field(default_factory=dict)  # every size auto chose, as lm-eval records `batch_sizes`

    @classmethod
    def parse(cls, value: Any, max_batch_size: Any = None) -> BatchSize:
        """`8`, `"8"`, `"auto"` or `"auto:N"`; anything else is refused naming the forms."""
        limit = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else _positive(max_batch_size, "max_batch_size")
        text = str(value).strip()
        if text == "auto" or text.startswith("auto:"):
            detections = text.partition(":")[2] or "1"
            return cls(None, _positive(detections, "batch_size", value), limit)
        return cls(_positive(value, "batch_size"), 1, limit)

    @property
    def is_auto(self) -> bool:
        return self.fixed is None

    def describe(self) -> str:
        """As lm-eval's `--batch_size` takes it."""
        if self.fixed is not None:
            return str(self.fixed)
        return "auto" if self.detections == 1 else f"auto:{self.detections}"

    def scheduler(self, probe: Callable[[int, Any], None], device: torch.device) -> Callable[[int, Sequence], int]:
        """The `batch_fn` of lm-eval's `Collator.get_batched`: the batch size at sorted position `pos` of
        `items`, detected with `probe(size, items[pos])` once per `auto:N` bucket of each request group."""
        if self.fixed is not None:
            return lambda pos, items: self.fixed
        held: dict[tuple[int, int], int] = {}

        def batch_size(pos: int, items: Sequence) -> int:
            bucket = pos * self.detections // max(len(items), 1)
            key = (id(items), bucket)
            if key not in held:
                before = held.get((id(items), bucket - 1))
                if before == self.max_batch_size:
                    held[key] = before
                else:
                    held[key] = self._detect(probe, items[pos], device)
                    self.chosen[len(self.chosen)] = held[key]
            return held[key]

        return batch_size

    def _detect(self, probe: Callable[[int, Any], None], item: Any, device: torch.device) -> int:
        if device.type not in PROBED_DEVICES:
            size = min(CPU_AUTO_BATCH_SIZE, self.max_batch_size)
            if not self.chosen:
                print(
                    f"mee: batch_size={self.describe()} on the {device.type.upper()}: running batch_size {size} (the "
                    "adapter's default; a CPU runs out of memory by swapping or the OOM killer, not by an error a "
                    "probe could catch); pass batch_size=N to choose another",
                    file=sys.stderr,
                )
            return size
        size = largest_fitting(lambda candidate: probe(candidate, item), self.max_batch_size)
        print(f"mee: batch_size={self.describe()}: the largest batch that fits is {size}", file=sys.stderr)
        return size


def _positive(value: Any, name: str, shown: Any = None) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"{name}={shown if shown is not None else value!r} must be a positive integer"
            + (", auto or auto:N (N detections)" if name == "batch_size" else "")
        )
    return int(text)
