"""Greedy generation with an exit policy over an unmodified Hugging Face model: the entry point.

`EarlyExitGenerator` tokenizes, checks its inputs, takes the prompt in, and hands the rest of the
call to the policy's decoding strategy, chosen once: `early_exit` (`early_exit.py`: rows leave the
decoder at the layer their measure is confident at) or `self_speculative` (`speculative.py`:
lossless draft-and-verify). Each strategy is a step generator over a `Decode` (`generation.py`), so
that a timer can interleave two decodes token by token (lockstep pairing, docs/TIMING.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from mee_bench.engine.early_exit import early_exit_steps
from mee_bench.engine.generation import Decode, GenerationOutput, GenerationStats
from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import build_runner
from mee_bench.engine.speculative import self_speculative_steps
from mee_bench.engine.steps import ActiveClock, Steps, run_steps

log = logging.getLogger(__name__)

FALLBACK_INPUT_LIMIT = 512  # T5's own limit, for tokenizers that state none
# `ExitPolicy.decoding` -> its strategy: a step generator over one call's `Decode`
STRATEGIES: dict[str, Callable[[Decode], Steps[GenerationOutput]]] = {
    "early_exit": early_exit_steps,
    "self_speculative": self_speculative_steps,
}


def input_limit(tokenizer, requested: int | None = None) -> int:
    """Prompt tokens allowed: `requested`, else the tokenizer's `model_max_length` when it states a
    real one (Hugging Face uses ~1e30 for "none"), else 512."""
    if requested:
        return requested
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else FALLBACK_INPUT_LIMIT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EarlyExitGenerator:
    """Greedy early-exit generation over an unmodified Hugging Face model, through its layer runner.

    `heads_path` records where `heads` came from (reported with results); `heads_loader`, given
    instead of `heads`, reads them on first use, so a policy that needs none never opens the file.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        heads: ExitHeads | None = None,
        heads_path: Path | None = None,
        heads_loader: Callable[[], ExitHeads] | None = None,
    ) -> None:
        self.model = model
        self.runner = build_runner(model)
        self.tokenizer = tokenizer
        self._heads = heads.to(self.runner.device) if heads is not None else None
        self._heads_loader = heads_loader
        self.heads_path = heads_path

    @property
    def heads(self) -> ExitHeads | None:
        """The exit heads (read now if they were given as a loader), or None."""
        if self._heads is None and self._heads_loader is not None:
            self._heads = self._heads_loader().to(self.runner.device)
            self._heads_loader = None
        return self._heads

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    def tokenize(self, prompts: Sequence[str], max_input_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded input ids; prompts longer than the model allows are truncated with a warning."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("empty input: every prompt must be a non-empty string")
        limit = input_limit(self.tokenizer, max_input_length)
        lengths = [len(ids) for ids in self.tokenizer(list(prompts)).input_ids]
        too_long = sum(n > limit for n in lengths)
        if too_long:
            log.warning(
                "%d of %d prompts exceed %d tokens and are truncated (set max_input_length to change the limit)",
                too_long,
                len(prompts),
                limit,
            )
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=limit)
        return enc.input_ids.to(self.runner.device), enc.attention_mask.to(self.runner.device)

    def generate_text(
        self,
        prompts: Sequence[str],
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        max_input_length: int | None = None,
    ) -> tuple[list[str], GenerationOutput]:
        return run_steps(self.text_steps(prompts, policy, max_new_tokens, stop_strings, max_input_length))

    def text_steps(
        self,
        prompts: Sequence[str],
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        max_input_length: int | None = None,
    ) -> Steps[tuple[list[str], GenerationOutput]]:
        """`generate_text` a step at a time (see `decode_steps`)."""
        input_ids, attention_mask = self.tokenize(prompts, max_input_length)
        output = yield from self.decode_steps(input_ids, attention_mask, policy, max_new_tokens, stop_strings)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in output.tokens]
        return texts, output

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
    ) -> GenerationOutput:
        """Greedy early-exit generation of `input_ids` [B, S] under `policy`."""
        return run_steps(self.decode_steps(input_ids, attention_mask, policy, max_new_tokens, stop_strings))

    @torch.inference_mode()
    def decode_steps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        policy: ExitPolicy,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
        until_truncated: bool = False,
    ) -> Steps[GenerationOutput]:
        """`generate` as a generator: it yields after the prompt is taken in and after every
        generated step (a self-speculative round), and returns the `GenerationOutput`. Its timings
        count only the time spent inside it, however long it waits at a yield. `Truncate` thrown
        in at a step's yield (early-exit decoding) ends it there, with the tokens so far. With
        `until_truncated` (a timing baseline) a single row ends at no EOS or stop string: it decodes
        on until `Truncate` (or `max_new_tokens`), so it covers exactly the steps of the policy it is
        paired with. The rows of a larger batch still end at theirs: kept alive, they would make the
        baseline's steps wider than they are."""
        runner, num_layers = self.runner, self.runner.num_layers
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError("empty input: input_ids must be a non-empty [batch, length] tensor")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: build EarlyExitGenerator(model, tokenizer)")
        policy.check_model(num_layers)
        if until_truncated and policy.decoding != "early_exit":
            raise ValueError("until_truncated is for a timing baseline decoding early-exit style (e.g. `full`)")
        measure = policy.build_measure(self.heads if policy.needs_heads else None)
        measure.last_check_layer = num_layers - 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = runner.device
        one_row_baseline = until_truncated and input_ids.shape[0] == 1
        is_finished = (lambda row: False) if one_row_baseline else self._finished_check(stop_strings)
        stats = GenerationStats(num_layers=num_layers)
        clock = ActiveClock()

        started = clock.now()
        cache, last_tokens = runner.start(input_ids, attention_mask, max_new_tokens)
        _sync(device)
        stats.encoder_s = clock.now() - started
        yield from clock.pause()

        started = clock.now()
        decode = Decode(runner, cache, last_tokens, policy, measure, max_new_tokens, is_finished, stats, clock)
        output = yield from STRATEGIES[policy.decoding](decode)
        _sync(device)
        stats.decoder_s = clock.now() - started
        return output

    def _finished_check(self, stop_strings: Sequence[str]) -> Callable[[list[int]], bool]:
        """Whether a row's tokens so far end its generation: EOS last, or a stop string in its text."""

        def finished(tokens: list[int]) -> bool:
            if tokens[-1] == self.runner.eos_token_id:
                return True
            if not stop_strings:
                return False
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # once a step, whatever the stops
            return any(stop in text for stop in stop_strings)

        return finished
