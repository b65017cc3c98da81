"""The T5 layer runner: the one place that knows T5 decoder internals.

Running one decoder layer against an explicit key/value cache, projecting a skipped
layer's K/V from an exit state, and the logits of any layer. Decoding, training and the
analysis read layers through here, so a transformers change is fixed once. We call the
model's own modules (layer norms, q/k/v/o projections, feed-forward, final norm, LM head)
and never fork `modeling_t5.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.runner import HeadReads, captured_outputs, register_runner, write_slots


@dataclass
class DecoderCache:
    """Per-layer self-attention K/V for every decoder position, plus the cross-attention K/V.

    Preallocated for the whole generation so that a row's entries can be written at any
    position and any layer (the copy and deferred strategies both need that).
    """

    self_k: Tensor  # [layers, B, H, T, d_kv]: one tensor, so skipped layers are written in one call
    self_v: Tensor
    cross_k: list[Tensor]  # per layer [B, H, S, d_kv]
    cross_v: list[Tensor]
    cross_bias: Tensor  # [B, 1, 1, S] additive encoder padding mask
    self_bias: Tensor  # [H, T, T] relative position bias with the causal mask folded in


@register_runner("t5", "mt5")
class T5LayerRunner(HeadReads):
    """Runs an unmodified Hugging Face T5 decoder one layer at a time (a `LayerRunner`).

    `rows` selects the batch rows being computed (None = all rows, no copies); queries sit
    at explicit decoder `positions`, so a block of catch-up tokens and the current token
    can run in one call.
    """

    is_encoder_decoder = True
    prefills_first_step = False  # step 0 is the decoder start token, run like any other step

    def __init__(self, model) -> None:
        config = model.config
        self.model = model
        self.config = config
        self.blocks = list(model.decoder.block)
        self.num_layers, self.hidden_size = self.config_dims(config)
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.start_token_id = config.decoder_start_token_id
        self.eos_token_id = config.eos_token_id
        # T5 scales decoder outputs before a tied LM head; mT5's config has no such flag and its model never scales
        self.output_scale = self.hidden_size**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
        self.position_bias_module = self.blocks[0].layer[0].SelfAttention
        self._kv_weights: Tensor | None = None

    @classmethod
    def config_dims(cls, config) -> tuple[int, int]:
        return config.num_decoder_layers or config.num_layers, config.d_model

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def start(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int) -> tuple[DecoderCache, Tensor]:
        """Encode the prompt and preallocate the decoder cache; every row starts from the decoder start token."""
        cache = self.new_cache(self.encode(input_ids, attention_mask), attention_mask, max_new_tokens)
        first = torch.full((input_ids.shape[0],), self.start_token_id, dtype=torch.long, device=input_ids.device)
        return cache, first

    def new_cache(self, encoder_states: Tensor, attention_mask: Tensor, max_positions: int) -> DecoderCache:
        batch, dtype = encoder_states.shape[0], encoder_states.dtype
        shape = (batch, self.num_heads, max_positions, self.d_kv)
        cross_k, cross_v = [], []
        for block in self.blocks:
            attn = block.layer[1].EncDecAttention
            cross_k.append(self._heads(attn.k(encoder_states)))
            cross_v.append(self._heads(attn.v(encoder_states)))
        min_value = torch.finfo(dtype).min
        cross_bias = torch.zeros(attention_mask.shape, dtype=dtype, device=encoder_states.device)
        cross_bias = cross_bias.masked_fill(attention_mask == 0, min_value)[:, None, None, :]
        return DecoderCache(
            self_k=encoder_states.new_zeros(self.num_layers, *shape),
            self_v=encoder_states.new_zeros(self.num_layers, *shape),
            cross_k=cross_k,
            cross_v=cross_v,
            cross_bias=cross_bias,
            self_bias=self.causal_position_bias(max_positions, dtype),
        )

    def causal_position_bias(self, length: int, dtype: torch.dtype) -> Tensor:
        bias = self.position_bias_module.compute_bias(length, length, device=self.device)[0].to(dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        return torch.where(causal, bias, torch.finfo(dtype).min)

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.model.decoder.embed_tokens(token_ids)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.d_kv).transpose(-3, -2)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(-3, -2).reshape(*x.shape[:-3], x.shape[-2], self.num_heads * self.d_kv)

    def layer(
        self,
        index: int,
        hidden: Tensor,
        cache: DecoderCache,
        rows: Tensor | None,
        positions: Tensor | int,
        last_position: int,
    ) -> Tensor:
        """Run decoder layer `index` (0-based) on `hidden` [A, Q, d] and write its K/V.

        `positions` is an int (one query per row at that position) or a [A, Q] tensor;
        keys span positions 0..`last_position`.
        """
        block = self.blocks[index]
        self_attn_layer, cross_layer = block.layer[0], block.layer[1]
        attn = self_attn_layer.SelfAttention
        normed = self_attn_layer.layer_norm(hidden)
        query = self._heads(attn.q(normed))
        self._write_kv(cache, index, rows, positions, self._heads(attn.k(normed)), self._heads(attn.v(normed)))
        end = last_position + 1
        if rows is None:
            keys, values = cache.self_k[index][:, :, :end], cache.self_v[index][:, :, :end]
        else:
            keys, values = cache.self_k[index][rows, :, :end], cache.self_v[index][rows, :, :end]
        if isinstance(positions, int):
            bias = cache.self_bias[:, positions : positions + 1, :end]
        else:
            bias = cache.self_bias[:, :, :end][:, positions].transpose(0, 1)
        context = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=1.0)
        hidden = hidden + attn.o(self._merge(context))

        cross = cross_layer.EncDecAttention
        query = self._heads(cross.q(cross_layer.layer_norm(hidden)))
        if rows is None:
            keys, values, bias = cache.cross_k[index], cache.cross_v[index], cache.cross_bias
        else:
            keys, values, bias = cache.cross_k[index][rows], cache.cross_v[index][rows], cache.cross_bias[rows]
        context = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=1.0)
        hidden = hidden + cross.o(self._merge(context))
        return block.layer[-1](hidden)

    def _write_kv(
        self, cache: DecoderCache, index: int, rows: Tensor | None, positions: Tensor | int, key: Tensor, value: Tensor
    ) -> None:
        write_slots(cache.self_k[index], cache.self_v[index], rows, positions, key, value)

    def copy_skipped_kv(
        self, first_skipped: int, hidden: Tensor, cache: DecoderCache, rows: Tensor, position: int
    ) -> None:
        """CALM's state copying: layers >= `first_skipped` get K/V projected from the exit state
        [A, 1, d], each through its own layer norm and K/V weights, as one matmul."""
        first_norm = self.blocks[first_skipped].layer[0].layer_norm
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        normed = (hidden * torch.rsqrt(variance + first_norm.variance_epsilon)).to(hidden.dtype)
        skipped = self.num_layers - first_skipped
        width = self.num_heads * self.d_kv
        weights = self._stacked_kv_weights()[first_skipped * 2 * width :]
        kv = (normed[:, 0] @ weights.T).view(-1, skipped, 2, self.num_heads, self.d_kv).transpose(0, 1)
        cache.self_k[first_skipped:, rows, :, position] = kv[:, :, 0]
        cache.self_v[first_skipped:, rows, :, position] = kv[:, :, 1]

    def _stacked_kv_weights(self) -> Tensor:
        """Every decoder layer's self-attention K and V weights with its layer-norm weight folded
        in ([layers * 2 * inner, d]); built once, for inference (training does not copy states)."""
        if self._kv_weights is None:
            parts = []
            for block in self.blocks:
                layer = block.layer[0]
                scale = layer.layer_norm.weight
                parts += [layer.SelfAttention.k.weight * scale, layer.SelfAttention.v.weight * scale]
            self._kv_weights = torch.cat(parts).detach()
        return self._kv_weights

    def head_input(self, hidden: Tensor) -> Tensor:
        """The model's final norm and output scaling (T5's head has no bias)."""
        return self.final_norm(hidden) * self.output_scale

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.decoder.final_layer_norm(hidden)

    def rms_head_gain(self) -> tuple[Tensor, float]:
        norm = self.model.decoder.final_layer_norm
        return norm.weight * self.output_scale, norm.variance_epsilon

    def head_parameters(self) -> list[Tensor]:
        return [self.model.decoder.final_layer_norm.weight, self.model.lm_head.weight]

    def all_layer_states(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> list[Tensor]:
        """Teacher-forced raw states of every decoder layer (not final-normed), embedding first.

        Captured with forward hooks on the decoder blocks: Hugging Face's `decoder_hidden_states`
        ends with an already final-normed state, and applying `logits` to it would norm twice.
        The LM head does not run (at a large vocabulary its logits for every position cost
        gigabytes); the decoder's own final norm still runs on the last state (negligible).
        """
        encoded = self.encode(input_ids, attention_mask)
        captured = captured_outputs(
            self.blocks,
            lambda: self.model.decoder(
                input_ids=decoder_input_ids,
                encoder_hidden_states=encoded,
                encoder_attention_mask=attention_mask,
                use_cache=False,
            ),
        )
        return [self.embed(decoder_input_ids), *captured]


def growing_generate_cache(model) -> dict:
    """`generate` keyword arguments for an empty cache that grows a layer at a time.

    transformers sizes `generate`'s default cache by the *encoder* depth, too shallow for a
    deeper decoder. The keyword is `cache` in recent transformers and `past_key_values` up to
    about 5.17 (the GPU image's version), so it is read off the model's own signature.
    """
    import inspect

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}
