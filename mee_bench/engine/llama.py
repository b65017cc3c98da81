"""The Llama-family layer runner: Llama, Mistral, Qwen2, Qwen3 and SmolLM3 share one module layout.

Embedding, decoder layers (input norm, q/k/v/o projections with Qwen2's biases or Qwen3's
q/k norms, rotary embeddings, SmolLM3's layers without them, post-attention norm, MLP), final
norm and LM head, tied or untied, with grouped-query attention. Each layer runs whole through
its own `forward`; this module only names the modules and projects a skipped layer's K/V.
Families that differ in a few of these places subclass it (`llama_variants.py`).
"""

from __future__ import annotations

import sys

from torch import Tensor

from mee_bench.engine.causal import CausalLayerRunner
from mee_bench.engine.runner import register_runner


@register_runner("llama", "mistral", "qwen2", "qwen3", "smollm3")
class LlamaLayerRunner(CausalLayerRunner):
    """Runs an unmodified Hugging Face Llama-family model one decoder layer at a time (a `LayerRunner`)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        # the rotary application of the layers' own modeling module (Llama's, Qwen3's, ...)
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._rotary: dict[str | None, tuple[Tensor, tuple[Tensor, Tensor]]] = {}

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

    def rotary(self, hidden: Tensor, position_ids: Tensor, layer_type: str | None = None) -> tuple[Tensor, Tensor]:
        """(cos, sin) from the model's own rotary module (per layer type where it keeps one table per type,
        as Gemma 3), kept while the positions stay the same."""
        held = self._rotary.get(layer_type)
        if held is None or held[0] is not position_ids:
            rotary_emb = self.model.model.rotary_emb
            table = (
                rotary_emb(hidden, position_ids) if layer_type is None else rotary_emb(hidden, position_ids, layer_type)
            )
            held = self._rotary[layer_type] = (position_ids, table)
        return held[1]

    def layer_rotary(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary table layer `index` is given."""
        return self.rotary(hidden, position_ids)

    def layer_inputs(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, dict]:
        return hidden, {"position_embeddings": self.layer_rotary(index, hidden, position_ids)}

    def kv_states(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Layer `index`'s K (before rotary) and V [A, kv_heads, Q, head_dim] of `hidden`, as its attention
        makes them: input norm, projections, Qwen3's and Gemma 3's per-head key norm."""
        layer = self.layers[index]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        key = attention.k_proj(normed).view(shape)
        if hasattr(attention, "k_norm"):
            key = attention.k_norm(key)
        return key.transpose(1, 2), attention.v_proj(normed).view(shape).transpose(1, 2)

    def project_kv(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        key, value = self.kv_states(index, hidden)
        if getattr(self.layers[index].self_attn, "use_rope", True):  # SmolLM3's NoPE layers rotate nothing
            # one rotary table for all the layers a copy fills (the same `position_ids`); an empty query
            # (no heads) so that only the key is rotated
            cos, sin = self.layer_rotary(index, hidden, position_ids)
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
