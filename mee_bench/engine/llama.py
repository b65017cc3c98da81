"""The Llama-family layer runner: Llama, Mistral, Qwen2 and Qwen3 share one module layout.

Embedding, decoder layers (input norm, q/k/v/o projections with Qwen2's biases or Qwen3's
q/k norms, rotary embeddings, post-attention norm, MLP), final norm and LM head, tied or
untied, with grouped-query attention. Each layer runs whole through its own `forward`;
this module only names the modules and projects a skipped layer's K/V.
"""

from __future__ import annotations

import sys

from torch import Tensor

from mee_bench.engine.causal import CausalLayerRunner
from mee_bench.engine.runner import register_runner


@register_runner("llama", "mistral", "qwen2", "qwen3")
class LlamaLayerRunner(CausalLayerRunner):
    """Runs an unmodified Hugging Face Llama-family model one decoder layer at a time (a `LayerRunner`)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        # the rotary application of the layers' own modeling module (Llama's, Qwen3's, ...)
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._rotary: tuple[Tensor, tuple[Tensor, Tensor]] | None = None

    def decoder_layers(self) -> list:
        return list(self.model.model.layers)

    def kv_shape(self) -> tuple[int, int]:
        config = self.config
        heads = config.num_key_value_heads or config.num_attention_heads
        return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def sliding_window(self, index: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(token_ids)

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) from the model's own rotary module, kept while the positions stay the same."""
        if self._rotary is None or self._rotary[0] is not position_ids:
            self._rotary = (position_ids, self.model.model.rotary_emb(hidden, position_ids))
        return self._rotary[1]

    def layer_inputs(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, dict]:
        return hidden, {"position_embeddings": self.rotary(hidden, position_ids)}

    def project_kv(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.layers[index]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        key = attention.k_proj(normed).view(shape)
        if hasattr(attention, "k_norm"):
            key = attention.k_norm(key)
        key = key.transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        # one rotary table for all the layers a copy fills (the same `position_ids`); an empty query
        # (no heads) so that only the key is rotated
        cos, sin = self.rotary(hidden, position_ids)
        _, key = self.apply_rotary(key[:, :0], key, cos, sin)
        return key, value

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.model.norm(hidden)

    def rms_head_gain(self) -> tuple[Tensor, float]:
        return self.model.model.norm.weight, self.model.model.norm.variance_epsilon

    def head_parameters(self) -> list[Tensor]:
        return [self.model.model.norm.weight, self.model.lm_head.weight]

    def backbone(self):
        return self.model.model
