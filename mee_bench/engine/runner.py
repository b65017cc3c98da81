"""The model-family seam: what decoding, the measures, training and the study need from a model.

A runner drives an unmodified Hugging Face model one decoder layer at a time against its
own cache. Everything outside the runner (the decoding loop, objectives, head training,
the analysis) speaks this protocol only, so a new family is one module with a runner
class registered for its `config.model_type`:

    @register_runner("llama", "mistral")
    class LlamaLayerRunner: ...

and one import line in `mee_bench/engine/__init__.py`, which loads every family.

Positions are generation steps: 0 is the first decoder input of `start`, whatever prompt
came before it (an encoder-decoder's prompt lives in the encoder; a decoder-only runner
offsets each row by its prompt length inside its own cache). A decoder-only runner's step 0
input is the prompt's last token, which its prefill already ran through every layer
(`prefills_first_step`): step 0 then reads those states back instead of computing them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class LayerRunner(Protocol):
    """One model family's layers, cache and head, as the early-exit engine uses them."""

    num_layers: int  # decoder layers an exit can happen after (the last one included)
    hidden_size: int  # width of every layer's state
    is_encoder_decoder: bool
    start_token_id: int  # a generation's first decoder input when `start` has no prompt token to feed
    eos_token_id: int
    # `start` ran step 0 through every layer: `layer(..., 0, 0)` returns its stored states and its
    # K/V are real in every layer, so an exit at step 0 has nothing to copy or defer
    prefills_first_step: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @classmethod
    def config_dims(cls, config: Any) -> tuple[int, int]:
        """(num_layers, hidden_size) from a Hugging Face config alone, without loading weights."""
        ...

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """The encoder's states [B, S, d]; None for a decoder-only model."""
        ...

    def start(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int) -> tuple[Any, Tensor]:
        """A new cache for `max_new_tokens` generation steps with the prompt taken in (encoded or
        prefilled), and the first decoder input token of every row [B]."""
        ...

    def embed(self, token_ids: Tensor) -> Tensor:
        """Decoder input states [..., d] of `token_ids`: "layer 0" for the measures."""
        ...

    def layer(
        self, index: int, hidden: Tensor, cache: Any, rows: Tensor | None, positions: Tensor | int, last_position: int
    ) -> Tensor:
        """Run layer `index` (0-based) on `hidden` [A, Q, d] of batch `rows` (None = all) at generation
        `positions` (an int, or [A, Q]) against keys 0..`last_position`, writing its K/V; the raw output.
        With `prefills_first_step`, step 0 (`positions` == `last_position` == 0) is the prefill's
        stored output of layer `index` for `rows`, whatever `hidden` is: nothing runs or is written."""
        ...

    def copy_skipped_kv(self, first_skipped: int, hidden: Tensor, cache: Any, rows: Tensor, position: int) -> None:
        """Fill layers >= `first_skipped` at `position` of `rows` with K/V projected from the exit state [A, 1, d]."""
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of any layer's raw output: the model's own final norm and head."""
        ...

    def head_rows(self, token_ids: Tensor) -> HeadRows:
        """The head's rows for `token_ids` [A, k], gathered once per token for `logits_for`."""
        ...

    def logits_for(self, hidden: Tensor, rows: HeadRows) -> Tensor:
        """The logits of `rows.token_ids` only, for `hidden` [A, Q, d]: [A, Q, k], the values of
        `logits(hidden)` at those ids (to rounding), through k rows of the head (cheap pruned checks)."""
        ...

    def approximate_logits(self, hidden: Tensor) -> Tensor:
        """`logits(hidden)` through a cheaper copy of the head (int8 rows on a CPU, 16-bit elsewhere):
        for exit decisions and choosing which rows of the head pruned checks read, at a quarter or
        half the memory traffic of a 32-bit `logits` (the head is the largest matrix a check
        touches); never for choosing a token."""
        ...

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The model's own final norm: what the head reads (distillation compares these states)."""
        ...

    def head_parameters(self) -> list[Tensor]:
        """The parameters `logits` uses (final norm, head), for training through chunked logits."""
        ...

    def all_layer_states(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> list[Tensor]:
        """Teacher-forced raw states [B, T, d] at the `decoder_input_ids` positions given the prompt: the
        embedding first, then every layer 1..L, not final-normed, in the autograd graph."""
        ...


RUNNERS: dict[str, type] = {}
# Families tried and refused, with the reason: a user with such a checkpoint learns why, not only that.
REFUSED: dict[str, str] = {
    "gemma2": "its attention soft-caps scores (attn_logit_softcapping), which needs eager attention, and the "
    "decoder-only runners hand sdpa an explicit mask",
    "umt5": "it has a relative position bias in every layer, which the T5 runner does not compute",
}
INT8_ENGINES = ("x86", "fbgemm")  # quantized engines whose int8 linear kernels make `approximate_logits` cheap


@dataclass(frozen=True)
class HeadRows:
    """k rows of the LM head per running row: a pruned check reads these instead of the whole head.

    With `rms_eps` set, the family's final norm is an RMS norm whose gain (and any output scale) is
    already multiplied into `weight`, so a check is one small matmul scaled by 1/rms of the state:
    about a third of the tensor calls of running the norm module first."""

    token_ids: Tensor  # [A, k]
    weight: Tensor  # [A, d, k]
    bias: Tensor | None = None  # [A, 1, k]
    rms_eps: float | None = None

    def select(self, keep: Tensor) -> HeadRows:
        """Only the running rows `keep` (a mask or indices)."""
        bias = None if self.bias is None else self.bias[keep]
        return HeadRows(self.token_ids[keep], self.weight[keep], bias, self.rms_eps)


class HeadReads:
    """What every family shares through its LM head: the runner's dtype and device, and the three
    reads of the head (full, k rows, approximate) from the family's `head_input`."""

    model: Any

    def head_input(self, hidden: Tensor) -> Tensor:
        """What the LM head multiplies: the model's final norm of a raw layer output (and any scaling)."""
        raise NotImplementedError

    def head_output(self, logits: Tensor) -> Tensor:
        """The model's own last step after the head (Gemma's logit soft-capping); elementwise, so it
        applies to any subset of the vocabulary alike."""
        return logits

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def logits(self, hidden: Tensor) -> Tensor:
        """The head as the model applies it; at inference on a CPU through a column-major copy of its
        weight: at one to three rows the BLAS gemv streams a `[d, vocab]` layout several times faster
        than the `[vocab, d]` one `nn.Linear` hands it, for the same products up to the order of
        their sums."""
        head = self.model.lm_head
        if torch.is_grad_enabled() or head.weight.device.type != "cpu":
            return self.head_output(head(self.head_input(hidden)))
        logits = self.head_input(hidden) @ self._head_copy("columns", lambda weight: weight.t().contiguous())
        return self.head_output(logits if head.bias is None else logits + head.bias)

    def rms_head_gain(self) -> tuple[Tensor, float] | None:
        """(g, eps) when `head_input(h)` is `g * h / sqrt(mean(h^2) + eps)` (an RMS final norm, any output
        scale folded into g), so pruned checks can fold g into the head's rows; None otherwise."""
        return None

    def head_rows(self, token_ids: Tensor) -> HeadRows:
        head = self.model.lm_head
        weight = F.embedding(token_ids, head.weight)
        folded = self.rms_head_gain()
        if folded is not None:
            weight = weight * folded[0]
        bias = None if head.bias is None else head.bias[token_ids][:, None, :]
        return HeadRows(token_ids, weight.transpose(1, 2), bias, None if folded is None else folded[1])

    def logits_for(self, hidden: Tensor, rows: HeadRows) -> Tensor:
        if rows.rms_eps is None:
            logits = self.head_input(hidden) @ rows.weight
        else:
            logits = (hidden @ rows.weight) * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + rows.rms_eps)
        return self.head_output(logits if rows.bias is None else logits + rows.bias)

    def approximate_logits(self, hidden: Tensor) -> Tensor:
        """On a CPU with x86 int8 kernels, through the head's rows rounded to int8 (the state is
        quantized per call): a quarter of the bytes, where a 16-bit copy saves little over the
        column-major float read; it pays on large heads only, whose read dominates a check
        (`benchmarks/first_read.py`). Elsewhere through a float16 copy."""
        head = self.model.lm_head
        if head.weight.device.type == "cpu" and torch.backends.quantized.engine in INT8_ENGINES:
            packed = self._head_copy("int8", _int8_rows)
            logits = torch.ops.quantized.linear_dynamic(self.head_input(hidden).float(), packed, True)
            return self.head_output(logits if head.bias is None else logits + head.bias.float())
        half = self._head_copy(
            "half", lambda weight: weight if weight.element_size() <= 2 else weight.to(torch.float16)
        )
        logits = self.head_input(hidden).to(half.dtype) @ half.T
        return self.head_output(logits if head.bias is None else logits + head.bias.to(half.dtype))

    def _head_copy(self, kind: str, build: Callable[[Tensor], Any]) -> Any:
        """The head's weight as `build` remakes it (column-major, int8, half precision), kept per `kind`
        until the weight changes: a new storage or an in-place update."""
        weight = self.model.lm_head.weight
        version = (weight.data_ptr(), weight._version)
        copies: dict[str, tuple[tuple[int, int], Any]] = self.__dict__.setdefault("_head_copies", {})
        if kind not in copies or copies[kind][0] != version:
            copies[kind] = (version, build(weight.detach()))
        return copies[kind][1]


def _int8_rows(weight: Tensor) -> Any:
    """The head's rows as symmetric int8 (one scale per vocabulary row), packed for the CPU's int8
    kernels. torch marks its quantized tensor type deprecated (torchao succeeds it); the pinned torch
    has these kernels, and the warning is silenced for the one tensor made here."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.quantize_per_channel(weight, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(rows, None)


def register_runner(*model_types: str) -> Callable[[type], type]:
    """Class decorator: `cls` runs models whose `config.model_type` is one of `model_types`."""

    def register(cls: type) -> type:
        for model_type in model_types:
            RUNNERS[model_type] = cls
        return cls

    return register


def supported_model_types() -> list[str]:
    return sorted(RUNNERS)


def runner_class(model_type: str) -> type:
    """The runner registered for a Hugging Face `config.model_type`, or a clear error."""
    if model_type in REFUSED:
        raise ValueError(
            f"model type {model_type!r} is not supported: {REFUSED[model_type]}; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    if model_type not in RUNNERS:
        raise ValueError(
            f"no layer runner for model type {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())} (a new family is a runner module in mee_bench/engine "
            "registered with @register_runner)"
        )
    return RUNNERS[model_type]


def build_runner(model: Any) -> LayerRunner:
    """The layer runner for a loaded Hugging Face model, chosen by its `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return runner_class(str(model_type))(model)


def active_rows(rows: Tensor, batch: int) -> Tensor | None:
    """The `rows` argument a runner's layer takes: None when every row of the batch runs, so that the
    layer slices nothing (the common case, and the only one at batch size 1)."""
    return None if rows.numel() == batch else rows


def write_slots(
    keys: Tensor, values: Tensor, rows: Tensor | None, slots: Tensor | int, key: Tensor, value: Tensor
) -> None:
    """Write `key`/`value` [A, H, Q, d] into one layer's [B, H, slots, d] cache tensors at `slots` of `rows`
    (every family's self-attention cache has this layout). An int slot (every row at one position, the
    usual step) is a slice; per-row slots [A, Q] a scatter."""
    if isinstance(slots, int):
        index = slice(None) if rows is None else rows
        keys[index, :, slots] = key[:, :, 0]
        values[index, :, slots] = value[:, :, 0]
        return
    batch_rows = (rows if rows is not None else torch.arange(key.shape[0], device=key.device))[:, None]
    batch_rows = batch_rows.expand_as(slots)
    keys[batch_rows, :, slots] = key.transpose(1, 2)
    values[batch_rows, :, slots] = value.transpose(1, 2)


def captured_outputs(layers, run: Callable[[], Any]) -> list[Tensor]:
    """The hidden-state output of each of `layers` while `run()` runs the model's own forward, in call
    order: forward hooks read the raw layer outputs, where the model's own hidden-state outputs end
    with an already final-normed state."""
    captured: list[Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return captured
