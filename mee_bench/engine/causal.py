"""What every decoder-only layer runner shares: a slot cache, the causal mask, prefill, teacher forcing.

A decoder-only model has no encoder: its prompt goes through the same layers as the tokens
it generates. `start` left-aligns the prompt and runs every layer over all of its tokens in
one parallel prefill, as the model's own `generate` does, keeping each layer's output at the
last prompt token. That token is generation step 0's input (as T5's step 0 input is its
decoder start token), and `layer` at step 0 hands back the stored state: the decoding loop
still checks the measure after every layer, so the first generated token can exit early too,
without a separate single-token pass and without touching the prompt's real K/V.

Each family's runner (`llama.py`, `gpt2.py`) calls its model's own decoder layer modules
whole. Their attention asks the cache passed to them for the keys and values to attend
over (`cache.update(keys, values, layer_idx, ...)`); `SlotWriter` answers that call from
one preallocated tensor, so a row's K/V can be written at any slot of any layer (the copy
and deferred strategies both need that), and the runner passes an explicit 4D mask
(causal, left padding, sliding window) so the layer never builds its own.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mee_bench.engine.runner import HeadReads, captured_outputs, write_slots


@dataclass
class SlotCache:
    """Per-layer K/V of every slot (prompt tokens, then one slot per generation step) of every row.

    Slot `offset + p` holds generation step p; row r's prompt starts at slot `pads[r]`.
    """

    keys: Tensor  # [layers, B, kv_heads, slots, head_dim]
    values: Tensor
    pads: Tensor  # [B] left padding of each row
    padded: bool  # any row has padding (else a query at the last slot, or the prefill, needs no mask)
    offset: int  # slot of generation step 0 (the prompt's last token)
    first_states: Tensor  # [layers, B, 1, d] each layer's prefill output at the prompt's last token: step 0
    memo: dict = field(default_factory=dict)  # per attention window: the mask and positions of the latest call shape


@dataclass
class SlotWriter:
    """The `cache` a Hugging Face attention module sees for one call: writes its new K/V at
    `slots` of `rows` and returns the K/V of slots 0..end-1 of those rows."""

    cache: SlotCache
    rows: Tensor | None  # None = every row
    slots: Tensor | int  # an int (one query per row) or [A, Q]
    end: int

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        write_slots(keys, values, self.rows, self.slots, key_states, value_states)
        if self.rows is None:
            return keys[:, :, : self.end], values[:, :, : self.end]
        return keys[self.rows, :, : self.end], values[self.rows, :, : self.end]


CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")  # newest transformers first


def cache_keyword(layer) -> str:
    """The keyword a decoder layer takes its cache by (renamed across transformers releases); passing
    the wrong one would land in `**kwargs` and be ignored, so an unknown signature is an error."""
    parameters = inspect.signature(layer.forward).parameters
    for keyword in CACHE_KEYWORDS:
        if keyword in parameters:
            return keyword
    raise TypeError(
        f"{type(layer).__name__}.forward takes none of {', '.join(CACHE_KEYWORDS)}: this transformers release "
        "is not supported by mee-bench's decoder-only runners; install transformers 5.x"
    )


def left_align(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's padding to its left end (a right-padded batch becomes left-padded)."""
    width = input_ids.shape[1]
    columns = torch.arange(width, device=input_ids.device)
    last = torch.where(attention_mask.bool(), columns, -1).max(dim=1).values
    shift = (width - 1 - last)[:, None]
    index = (columns[None] - shift) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)


class CausalLayerRunner(HeadReads, ABC):
    """The decoder-only half of a `LayerRunner`; a family subclass names its modules (the abstract
    methods) and, when its layers take more than the mask and positions, overrides `layer_inputs`."""

    is_encoder_decoder = False
    prefills_first_step = True

    def __init__(self, model) -> None:
        config = model.config
        config._attn_implementation = "sdpa"  # an explicit 4D mask; eager and flash kernels differ in what they take
        self.model = model
        self.config = config
        self.num_layers, self.hidden_size = self.config_dims(config)
        self.layers = self.decoder_layers()
        self.num_kv_heads, self.head_dim = self.kv_shape()
        self.eos_token_id = _first(config.eos_token_id)
        # only a placeholder for `decoder_input_ids[:, 0]`: step 0's real input is the prompt's last token
        bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
        self.start_token_id = _first(bos) or 0
        self.windows = [self.sliding_window(index) for index in range(self.num_layers)]
        self.cache_keyword = cache_keyword(self.layers[0])

    @classmethod
    def config_dims(cls, config) -> tuple[int, int]:
        return config.num_hidden_layers, config.hidden_size

    def sliding_window(self, index: int) -> int | None:
        """Layer `index`'s attention window, or None for full causal attention."""
        return None

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        return None

    # What a family supplies.

    @abstractmethod
    def decoder_layers(self) -> list:
        """The model's own decoder layer modules, first to last."""

    @abstractmethod
    def kv_shape(self) -> tuple[int, int]:
        """(K/V heads, head width) of the layers' attention."""

    @abstractmethod
    def backbone(self):
        """The model without its LM head (what `all_layer_states` runs)."""

    @abstractmethod
    def embed(self, token_ids: Tensor) -> Tensor: ...

    @abstractmethod
    def project_kv(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Layer `index`'s K/V [A, kv_heads, Q, head_dim] of `hidden` [A, Q, d] as its attention makes them."""

    @abstractmethod
    def final_norm(self, hidden: Tensor) -> Tensor: ...

    @abstractmethod
    def head_parameters(self) -> list[Tensor]: ...

    def layer_inputs(self, index: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, dict]:
        """The layer's input state and extra keyword arguments at `position_ids` [A, Q]."""
        return hidden, {}

    def head_input(self, hidden: Tensor) -> Tensor:
        return self.final_norm(hidden)

    # The protocol.

    def start(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int) -> tuple[SlotCache, Tensor]:
        """Left-align the prompt, preallocate its slots and `max_new_tokens` - 1 more, run every layer over
        all prompt tokens and keep each layer's output at the last one; that token is each row's step 0
        input, already computed."""
        input_ids, attention_mask = left_align(input_ids, attention_mask)
        batch, width = input_ids.shape
        shape = (self.num_layers, batch, self.num_kv_heads, width - 1 + max_new_tokens, self.head_dim)
        cache = SlotCache(
            keys=torch.zeros(shape, dtype=self.dtype, device=self.device),
            values=torch.zeros(shape, dtype=self.dtype, device=self.device),
            pads=(attention_mask == 0).sum(1),
            padded=not bool(attention_mask.all()),
            offset=width - 1,
            first_states=torch.empty(self.num_layers, batch, 1, self.hidden_size, dtype=self.dtype, device=self.device),
        )
        slots = torch.arange(width, device=self.device).expand(batch, -1)
        hidden = self.embed(input_ids)
        for index in range(self.num_layers):
            hidden = self._run(index, hidden, cache, None, slots, width, prefix=True)
            cache.first_states[index] = hidden[:, -1:]
        cache.memo.clear()
        return cache, input_ids[:, -1].clone()

    def layer(
        self,
        index: int,
        hidden: Tensor,
        cache: SlotCache,
        rows: Tensor | None,
        positions: Tensor | int,
        last_position: int,
    ) -> Tensor:
        if isinstance(positions, int) and positions == last_position == 0:  # the prefill ran step 0
            return cache.first_states[index] if rows is None else cache.first_states[index, rows]
        return self._run(index, hidden, cache, rows, self._slots(cache, positions), last_position + cache.offset + 1)

    def copy_skipped_kv(
        self, first_skipped: int, hidden: Tensor, cache: SlotCache, rows: Tensor, position: int
    ) -> None:
        """CALM's state copying: each layer >= `first_skipped` gets the K/V its own norm, projections
        and rotary position make of the exit state [A, 1, d]."""
        slot = position + cache.offset
        position_ids = (slot - cache.pads[rows])[:, None]
        for index in range(first_skipped, self.num_layers):
            key, value = self.project_kv(index, hidden, position_ids)
            write_slots(cache.keys[index], cache.values[index], rows, slot, key, value)

    def all_layer_states(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> list[Tensor]:
        """Teacher-forced raw states at the generation steps `decoder_input_ids` stand for, embedding first.

        `decoder_input_ids[:, 0]` is the encoder-decoder's start token; here step 0's input is the
        prompt's last token instead, so the model runs over the prompt followed by
        `decoder_input_ids[:, 1:]` and the states of the last T positions come back. Captured with
        forward hooks on the model's own layers (its hidden-state outputs end final-normed).
        """
        input_ids, attention_mask = left_align(input_ids, attention_mask)
        steps = decoder_input_ids.shape[1]
        ids = torch.cat([input_ids, decoder_input_ids[:, 1:]], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(decoder_input_ids[:, 1:])], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        captured = captured_outputs(
            self.layers,
            lambda: self.backbone()(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False),
        )
        return [self.embed(ids[:, -steps:]), *(state[:, -steps:] for state in captured)]

    # Internals.

    @staticmethod
    def _slots(cache: SlotCache, positions: Tensor | int) -> Tensor | int:
        """Generation positions as cache slots; a position tensor keeps one slot tensor across layers."""
        if isinstance(positions, int):
            return positions + cache.offset
        held = cache.memo.get("slots")
        if held is None or held[0] is not positions:
            held = cache.memo["slots"] = (positions, positions + cache.offset)
        return held[1]

    def _run(
        self,
        index: int,
        hidden: Tensor,
        cache: SlotCache,
        rows: Tensor | None,
        slots: Tensor | int,
        end: int,
        prefix: bool = False,
    ) -> Tensor:
        """The model's own layer `index` on `hidden` at cache `slots` of `rows`, attending over slots
        0..end-1; `prefix`: the queries are exactly those slots, in order (the prefill)."""
        mask, position_ids = self._mask_and_positions(cache, rows, slots, end, self.windows[index], prefix)
        hidden, extra = self.layer_inputs(index, hidden, position_ids)
        extra[self.cache_keyword] = SlotWriter(cache, rows, slots, end)
        output = self.layers[index](hidden, attention_mask=mask, position_ids=position_ids, **extra)
        return output[0] if isinstance(output, tuple) else output

    def _mask_and_positions(
        self, cache: SlotCache, rows: Tensor | None, slots: Tensor | int, end: int, window: int | None, prefix: bool
    ) -> tuple[Tensor | None, Tensor]:
        """The boolean attention mask [A, 1, Q, end] and position ids [A, Q] of one call shape, memoized
        for the layers that follow (the same rows, slots and end until the loop moves on).

        No mask where none is needed: no padding, no window cutting in, and one query at the last
        slot (it sees every key) or the prefill (sdpa's own causal mask). The attention then takes
        its fast paths, as in the model's own generate (grouped K/V heads without copies)."""
        held = cache.memo.get(window)
        if held is not None and held[0] == end and _same(held[1], slots) and held[2] is rows:
            return held[3], held[4]
        pads = cache.pads if rows is None else cache.pads[rows]
        query = torch.as_tensor(slots, device=pads.device)
        query = query.expand(pads.shape[0], 1) if query.ndim == 0 else query
        position_ids = (query - pads[:, None]).clamp(min=0)  # padding slots never reach a real token
        last_query = prefix or isinstance(slots, int) and slots == end - 1
        if not cache.padded and (window is None or end <= window) and last_query:
            mask = None
        else:
            keys = torch.arange(end, device=pads.device)[None, None]
            q = query[..., None]
            mask = (keys <= q) & ((keys >= pads[:, None, None]) | (keys == q))
            if window is not None:
                mask &= keys > q - window
            mask = mask[:, None]
        cache.memo[window] = (end, slots, rows, mask, position_ids)
        return mask, position_ids


def _same(held: Tensor | int, slots: Tensor | int) -> bool:
    """The same call shape: equal int slots, or the very slot tensor (kept alive by the memo, so its
    identity cannot be reused)."""
    if isinstance(held, int) or isinstance(slots, int):
        return isinstance(held, int) and isinstance(slots, int) and held == slots
    return held is slots


def continuation_ids(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Targets as a decoder-only model continues a prompt with them: a leading space (the prompt ends
    with a cue such as "Answer:"), no special tokens, the model's EOS at the end (where generation stops)."""
    ids = tokenizer([" " + text.lstrip() for text in texts], add_special_tokens=False)["input_ids"]
    limit = max_length - 1 if max_length else None
    return [row[:limit] + [tokenizer.eos_token_id] for row in ids]


def _first(token_id: int | list[int] | None) -> int | None:
    """A config's token id; some list several (the first is the canonical one)."""
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id
