"""Training objectives: last-layer CE, CALM's weighted CE, FREE's layerwise distillation.

Every layer is read through the model's own final norm and LM head (the runner's `logits`)
applied to *raw* layer outputs (the runner's `all_layer_states`): Hugging Face's last
`decoder_hidden_states` entry is already final-normed, and norming it twice silently
changes top-1s. Per-layer cross-entropy runs in token chunks and
computes its gradient during the forward pass, so the logits of all layers (gigabytes
at a large vocabulary) never exist at once and nothing big is kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.runner import LayerRunner
from mee_bench.train.config import KD_MAPPINGS, OBJECTIVES, ObjectiveConfig
from mee_bench.train.data import IGNORE_INDEX


def layer_weights(num_layers: int) -> list[float]:
    """CALM's alpha_i = i / sum_j j for layers i = 1..L: deeper layers weigh more, weights sum to 1."""
    total = num_layers * (num_layers + 1) / 2
    return [i / total for i in range(1, num_layers + 1)]


def cross_entropy_and_gradient(logits: Tensor, labels: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed CE of fp32 `logits` [N, V] and its gradient, softmax minus the target
    distribution, written directly: autograd through `F.cross_entropy` spends more time in
    log-softmax's backward and NLL's zero-filled gradient than in the forward (docs/TRAINING.md)."""
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, labels[:, None]).squeeze(1)
    loss = log_normaliser - (1.0 - smoothing) * target_logits
    if smoothing:
        loss = loss - smoothing * logits.mean(dim=-1)
    gradient = torch.softmax(logits, dim=-1)
    if smoothing:
        gradient.sub_(smoothing / logits.shape[-1])
    gradient.scatter_add_(1, labels[:, None], gradient.new_full((labels.shape[0], 1), smoothing - 1.0))
    return loss.sum(), gradient


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean CE of `logits_fn(hidden)` against labels, chunk by chunk, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, labels, logits_fn, chunk, smoothing, *params):
        count = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for start in range(0, count, chunk):
                piece = hidden[start : start + chunk].detach().requires_grad_()
                logits = logits_fn(piece)
                loss, grad_logits = cross_entropy_and_gradient(
                    logits.detach().float(), labels[start : start + chunk], smoothing
                )
                grad_logits.div_(count)
                grads = torch.autograd.grad(logits, [piece, *params], grad_outputs=grad_logits.to(logits.dtype))
                grad_hidden[start : start + chunk] = grads[0]
                for accumulated, grad in zip(grad_params, grads[1:]):
                    accumulated += grad
                total += loss / count
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        return (grad_hidden * grad_output, None, None, None, None, *[g * grad_output for g in grad_params])


def chunked_cross_entropy(
    hidden: Tensor,
    labels: Tensor,
    logits_fn: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    chunk: int = 2048,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean CE over the rows of `hidden` [N, d]; equal to the unchunked loss in value and gradient.

    `params` are the parameters `logits_fn` uses that should receive gradients.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if not torch.is_grad_enabled():
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = logits_fn(hidden[start : start + chunk]).float()
            total += F.cross_entropy(
                logits, labels[start : start + chunk], reduction="sum", label_smoothing=label_smoothing
            )
        return total / hidden.shape[0]
    trainable = [p for p in params if p.requires_grad]
    return _ChunkedCrossEntropy.apply(hidden, labels, logits_fn, chunk, label_smoothing, *trainable)


def kd_mapping(
    exit_layer: int, num_layers: int, mapping: str, shallow: Sequence[Tensor] = (), deep: Sequence[Tensor] = ()
) -> list[int]:
    """FREE's layer map: the deep layer (1-based) each shallow layer 1..exit_layer learns from.

    `last`: all map to layer L; `uniform`: spread evenly over the deep layers, the exit layer
    to L; `closest`: the deep layer whose state is nearest in MSE (needs the states).
    """
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"kd exit_layer must be in 1..{num_layers - 1}, got {exit_layer}")
    deep_count = num_layers - exit_layer
    if mapping == "last":
        return [num_layers] * exit_layer
    if mapping == "uniform":
        return [exit_layer + math.ceil(i * deep_count / exit_layer) for i in range(1, exit_layer + 1)]
    if mapping == "closest":
        if len(shallow) != exit_layer or len(deep) != deep_count:
            raise ValueError("closest mapping needs the shallow and deep layers' states")
        mapped = []
        for state in shallow:
            distances = torch.stack([F.mse_loss(state.detach().float(), d.detach().float()) for d in deep])
            mapped.append(exit_layer + 1 + int(distances.argmin()))
        return mapped
    raise ValueError(f"unknown kd mapping {mapping!r}; use one of {', '.join(KD_MAPPINGS)}")


def distillation_loss(states: Sequence[Tensor], exit_layer: int, mapping: str) -> Tensor:
    """Mean MSE between shallow states (layers 1..exit_layer) and their mapped deep states (detached teachers)."""
    num_layers = len(states)
    shallow, deep = states[:exit_layer], states[exit_layer:]
    targets = kd_mapping(exit_layer, num_layers, mapping, shallow, deep)
    losses = [F.mse_loss(s.float(), states[t - 1].detach().float()) for s, t in zip(shallow, targets)]
    return torch.stack(losses).mean()


@dataclass
class Objective(ObjectiveConfig):
    """The configured loss (its fields are `ObjectiveConfig`'s, defaults included); `__call__` turns raw
    layer states into (loss, logged parts). `seed` seeds the shallow layers' position samples."""

    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; use one of {', '.join(OBJECTIVES)}")
        if self.kd_mapping not in KD_MAPPINGS:
            raise ValueError(f"unknown kd mapping {self.kd_mapping!r}; use one of {', '.join(KD_MAPPINGS)}")
        if not 0.0 < self.shallow_token_fraction <= 1.0:
            raise ValueError(f"shallow_token_fraction must be in (0, 1], got {self.shallow_token_fraction}")

    def __call__(
        self, runner: LayerRunner, states: Sequence[Tensor], labels: Tensor, step: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """`states`: raw outputs of decoder layers 1..L [B, T, d]; `labels` [B, T] with -100 on padding.
        `step` seeds the shallow layers' position samples, so a resumed run draws the same ones."""
        positions = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.flatten()[positions]
        params = runner.head_parameters()
        num_layers = len(states)
        layers = [num_layers] if self.name == "final" else range(1, num_layers + 1)
        weights = [1.0] if self.name == "final" else layer_weights(num_layers)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        loss, parts = None, {}
        for layer, weight in zip(layers, weights):
            rows = positions
            if layer < num_layers and self.shallow_token_fraction < 1.0:
                count = max(1, round(self.shallow_token_fraction * len(positions)))
                rows = positions[torch.randperm(len(positions), generator=generator)[:count].to(positions.device)]
            chosen = targets if rows is positions else labels.flatten()[rows]
            ce = chunked_cross_entropy(
                states[layer - 1].flatten(0, 1)[rows],
                chosen,
                runner.logits,
                params,
                self.chunk_tokens,
                self.label_smoothing,
            )
            parts[f"ce{layer}"] = float(ce.detach())
            loss = weight * ce if loss is None else loss + weight * ce
        if self.name == "weighted_ce_kd":
            # Distil the states the LM head reads (after the final RMS norm), not raw residual
            # states: the norm makes the CE blind to their scale, so an MSE between raw states
            # has no bound (measured: 5e3 -> 3e5 in 200 steps, every layer's CE at chance).
            kd = distillation_loss(
                [runner.final_norm(s.flatten(0, 1)[positions]) for s in states], self.kd_exit_layer, self.kd_mapping
            )
            parts["kd"] = float(kd.detach())
            loss = loss + self.kd_weight * kd
        parts["loss"] = float(loss.detach())
        return loss, parts


def decoder_layer_states(runner: LayerRunner, batch: dict[str, Tensor]) -> list[Tensor]:
    """Raw outputs of every decoder layer (1..L) under teacher forcing, kept in the autograd graph."""
    return runner.all_layer_states(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])[1:]
