"""Decoder-only families whose layers are called exactly as Llama's, differing in a few named places.

Each class below is the Llama runner with only what its modeling file does differently, read
from the model's own modules and config; the layers still run whole through their own `forward`:

- Granite: the embedding scaled by `embedding_multiplier`, the logits divided by `logits_scaling`
  (its residual and attention multipliers live inside the layers);
- OLMo 2: norms after attention and MLP instead of before (no input norm), q/k norms over the
  whole projection before it is split into heads;
- Phi-3: one fused `qkv_proj` (its partial rotary is its own `apply_rotary_pos_emb`'s business);
- Gemma 3 (text): one rotary table per layer type (local and global), `(1 + w)` RMS norms and,
  where the config asks, soft-capped logits. Soft-capped attention scores (Gemma 2) need eager
  attention, which the runners' explicit masks do not serve, and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.llama import LlamaLayerRunner
from mee_bench.engine.runner import register_runner


@register_runner("granite")
class GraniteLayerRunner(LlamaLayerRunner):
    """IBM Granite 3: Llama's layout with multipliers on the embedding, residuals, attention and logits."""

    def embed(self, token_ids: Tensor) -> Tensor:
        return super().embed(token_ids) * self.config.embedding_multiplier

    def head_input(self, hidden: Tensor) -> Tensor:
        return self.final_norm(hidden) / self.config.logits_scaling

    def rms_head_gain(self) -> tuple[Tensor, float]:
        norm = self.model.model.norm
        return norm.weight / self.config.logits_scaling, norm.variance_epsilon


@register_runner("olmo2")
class Olmo2LayerRunner(LlamaLayerRunner):
    """AI2's OLMo 2: the attention reads the raw state; q/k norms span all heads."""

    def kv_states(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        attention = self.layers[index].self_attn
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        key = attention.k_norm(attention.k_proj(hidden)).view(shape)
        return key.transpose(1, 2), attention.v_proj(hidden).view(shape).transpose(1, 2)


@register_runner("phi3")
class Phi3LayerRunner(LlamaLayerRunner):
    """Microsoft Phi-3 / Phi-4-mini: q, k and v from one fused projection; only its K and V rows run."""

    def kv_states(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.layers[index]
        qkv = layer.self_attn.qkv_proj
        start = self.config.num_attention_heads * self.head_dim  # the query's rows come first
        bias = None if qkv.bias is None else qkv.bias[start:]
        kv = F.linear(layer.input_layernorm(hidden), qkv.weight[start:], bias)
        key, value = kv.view(*hidden.shape[:-1], 2, -1, self.head_dim).unbind(-3)
        return key.transpose(1, 2), value.transpose(1, 2)


@register_runner("gemma3_text")
class Gemma3LayerRunner(LlamaLayerRunner):
    """Google Gemma 3 text models (Gemma3ForCausalLM): local and global rotary tables, `(1 + w)` norms."""

    def __init__(self, model) -> None:
        reason = self.refusal(model.config)
        if reason:
            raise ValueError(f"this Gemma 3 checkpoint cannot run: {reason}")
        super().__init__(model)

    @classmethod
    def refusal(cls, config) -> str | None:
        """Why a config of this type cannot run, or None."""
        if getattr(config, "attn_logit_softcapping", None) is not None:
            return "its attention soft-caps scores, which needs eager attention; mee-bench's runners use sdpa"
        if getattr(config, "use_bidirectional_attention", False):
            return "its attention is bidirectional (an embedding model), so it does not generate text"
        return None

    def layer_rotary(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary(hidden, position_ids, self.config.layer_types[index])

    def rms_head_gain(self) -> tuple[Tensor, float]:
        norm = self.model.model.norm
        return 1.0 + norm.weight, norm.eps

    def head_output(self, logits: Tensor) -> Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
