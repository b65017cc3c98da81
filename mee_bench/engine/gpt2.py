"""The GPT-2 layer runner: learned positions, fused `c_attn`, pre-norm blocks and `ln_f`.

Each `GPT2Block` runs whole through its own `forward`. GPT-2 adds its learned position
embedding to the token embedding; `embed` (what the measures see as "layer 0") is the token
embedding alone, and the position embedding joins on the way into the first block, where
the generation position is known.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mee_bench.engine.causal import CausalLayerRunner
from mee_bench.engine.runner import register_runner


@register_runner("gpt2")
class GPT2LayerRunner(CausalLayerRunner):
    """Runs an unmodified Hugging Face GPT-2 one block at a time (a `LayerRunner`)."""

    def decoder_layers(self) -> list:
        return list(self.model.transformer.h)

    def kv_shape(self) -> tuple[int, int]:
        return self.config.num_attention_heads, self.config.hidden_size // self.config.num_attention_heads

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.model.transformer.wte(token_ids)

    def layer_inputs(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, dict]:
        if index == 0:
            hidden = hidden + self.model.transformer.wpe(position_ids)
        return hidden, {}

    def project_kv(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Only the K and V columns of the block's fused `c_attn` (a `Conv1D`, weight [d, 3d]): the
        query third would be thrown away."""
        block = self.layers[index]
        c_attn, width = block.attn.c_attn, self.hidden_size
        normed = block.ln_1(hidden)
        kv = torch.addmm(c_attn.bias[width:], normed.reshape(-1, width), c_attn.weight[:, width:])
        key, value = kv.view(*hidden.shape[:-1], 2 * width).split(width, dim=-1)
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.transformer.ln_f(hidden)

    def head_parameters(self) -> list[Tensor]:
        ln_f = self.model.transformer.ln_f
        return [ln_f.weight, ln_f.bias, self.model.lm_head.weight]

    def backbone(self):
        return self.model.transformer
