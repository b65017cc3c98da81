"""An exit policy: which measure, what threshold (static or decaying), from which layer,
how skipped layers get their key/value entries, whether checks read a pruned vocabulary,
and whether the measure exits early or drafts for lossless self-speculation."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.measures import MEASURES, ExitMeasure, build_measure, measure_class

THRESHOLD_SCHEDULES = ("static", "decaying")
KV_STRATEGIES = ("copy", "deferred")
DECODINGS = ("early_exit", "self_speculative")


@dataclass(frozen=True)
class ExitPolicy:
    measure: str = "full"
    threshold: float = 0.9
    min_exit_layer: int = 4
    threshold_schedule: str = "static"
    tau: float = 4.0
    kv_strategy: str = "copy"
    vocab_top_k: int = 0  # > 0: checks after a token's first read its k best tokens only (0 = off)
    decoding: str = "early_exit"  # or "self_speculative": draft with min_exit_layer layers, verify with the rest
    max_draft: int = 4  # self_speculative: draft tokens proposed per verification at most

    def __post_init__(self) -> None:
        cls = measure_class(self.measure)
        low, high = cls.threshold_range
        if not (isinstance(self.threshold, (int, float)) and low <= self.threshold <= high):
            raise ValueError(
                f"threshold={self.threshold!r} is outside [{low}, {high}] for measure {self.measure!r}; "
                f"pick a value in that range"
            )
        if self.threshold_schedule not in THRESHOLD_SCHEDULES:
            raise ValueError(
                f"threshold_schedule={self.threshold_schedule!r} is unknown; use one of "
                f"{', '.join(THRESHOLD_SCHEDULES)}"
            )
        if self.kv_strategy not in KV_STRATEGIES:
            raise ValueError(f"kv_strategy={self.kv_strategy!r} is unknown; use one of {', '.join(KV_STRATEGIES)}")
        if not isinstance(self.min_exit_layer, int) or self.min_exit_layer < 1:
            raise ValueError(f"min_exit_layer={self.min_exit_layer!r} must be an integer >= 1")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau!r} must be > 0")
        if not isinstance(self.vocab_top_k, int) or self.vocab_top_k < 0 or self.vocab_top_k == 1:
            raise ValueError(
                f"vocab_top_k={self.vocab_top_k!r} must be 0 (full-vocabulary checks) or an integer >= 2 "
                "(a confidence compares the top two tokens)"
            )
        if self.vocab_top_k and not cls.vocab_prunable:
            prunable = ", ".join(sorted(name for name, c in MEASURES.items() if c.vocab_prunable))
            raise ValueError(
                f"vocab_top_k={self.vocab_top_k} does not apply to measure {self.measure!r}; "
                f"use vocab_top_k=0 or one of {prunable}"
            )
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding={self.decoding!r} is unknown; use one of {', '.join(DECODINGS)}")
        if self.decoding == "self_speculative":
            if not cls.can_exit:
                raise ValueError(
                    f"self_speculative drafting needs a measure that can exit, not {self.measure!r}; "
                    "use 'fixed' to draft with min_exit_layer layers always"
                )
            if self.vocab_top_k:
                raise ValueError("self_speculative drafts read the full head at the draft layer; set vocab_top_k=0")
            if not isinstance(self.max_draft, int) or self.max_draft < 1:
                raise ValueError(f"max_draft={self.max_draft!r} must be an integer >= 1")

    def check_model(self, num_layers: int) -> None:
        if self.measure != "full" and self.min_exit_layer > num_layers:
            raise ValueError(
                f"min_exit_layer={self.min_exit_layer} exceeds the model's {num_layers} decoder layers; "
                f"use a value in 1..{num_layers}"
            )
        if self.decoding == "self_speculative" and self.min_exit_layer >= num_layers:
            raise ValueError(
                f"self_speculative drafts with min_exit_layer={self.min_exit_layer} layers and verifies with the "
                f"rest, so it must be below the model's {num_layers} decoder layers; use 1..{num_layers - 1}"
            )

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        """The threshold for the token at `step` (0-based).

        `decaying` is the schedule lambda(t) = 0.9*lambda + 0.1*lambda*exp(-tau*t/N), N = max
        new tokens: it starts at lambda and relaxes towards 0.9*lambda as the output grows.
        """
        if self.threshold_schedule == "static":
            return self.threshold
        return 0.9 * self.threshold + 0.1 * self.threshold * math.exp(-self.tau * step / max_new_tokens)

    def build_measure(self, heads: ExitHeads | None = None) -> ExitMeasure:
        return build_measure(self.measure, heads)

    @property
    def needs_heads(self) -> bool:
        return measure_class(self.measure).needs_heads

    def as_dict(self) -> dict:
        return asdict(self)


POLICY_FILE = "exit_policy.json"


def read_policy_file(path: str | Path) -> tuple[ExitPolicy, dict]:
    """The policy in an `exit_policy.json` or a calibration record, and how it was calibrated.

    Both hold `{"policy": {ExitPolicy fields}, "calibration": {...}}`; a directory means the
    `exit_policy.json` a model ships beside its weights (written by `mee-bench calibrate --save-to`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no exit policy at {path}; write one with `mee-bench calibrate CONFIG --save-to DIR`")
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict) or not isinstance(content.get("policy"), dict):
        raise ValueError(f"{path} holds no `policy` object; pass a calibration record or an exit_policy.json")
    return ExitPolicy(**content["policy"]), content.get("calibration", {})


def shipped_policy_path(model_dir: str | Path | None) -> Path | None:
    """The `exit_policy.json` beside a local model's weights, if it ships one."""
    if model_dir is None:
        return None
    path = Path(model_dir).expanduser() / POLICY_FILE
    return path if path.is_file() else None


@functools.lru_cache(maxsize=256)
def rounded_to(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it: what `tensor >= value` compares against."""
    return torch.tensor(value, dtype=dtype).item()


def exit_decision(score: Tensor, threshold: float | Sequence[float]) -> tuple[Tensor | None, int]:
    """Which running rows' confidence `score` [A] reaches `threshold` (one for all rows, or one per
    row), and how many: every decoding path decides through here, against the threshold as the
    score's dtype holds it, so that early exit and self-speculation cannot decide differently in
    bf16. One row is compared on the host, with no tensor ops (the mask is then None)."""
    if not isinstance(threshold, (int, float)):
        if len(set(threshold)) > 1:
            limits = torch.tensor(
                [rounded_to(t, score.dtype) for t in threshold], dtype=score.dtype, device=score.device
            )
            exits = score >= limits
            return exits, int(exits.sum())
        threshold = threshold[0]
    if score.numel() == 1:
        return None, int(float(score) >= rounded_to(threshold, score.dtype))
    exits = score >= threshold
    return exits, int(exits.sum())
