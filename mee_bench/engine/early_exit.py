"""Early-exit decoding, one of the decoding strategies: after each layer the measure may let rows exit.

One token per step, one decoder layer at a time. Exited rows leave the active set, so they cost
nothing in deeper layers. Skipped layers get their self-attention K/V either copied from the exit
state (CALM) or computed later in one parallel catch-up call with the next token that goes deep
(FREE's synchronized parallel decoding, `deferred`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from mee_bench.engine.generation import Decode, GenerationOutput
from mee_bench.engine.policy import exit_decision
from mee_bench.engine.runner import HeadRows, LayerRunner, active_rows
from mee_bench.engine.steps import Steps, Truncate


class CheckLogits:
    """The logits a measure reads for the current token at the current layer, memoised.

    With `top_k` (the policy's `vocab_top_k`), a token's first read is the whole vocabulary
    through the runner's rounded copy of the head (int8 rows on a CPU), and keeps each row's k
    best token ids; the later reads of that token compute those k rows of the head only (CALM's
    vocabulary-pruned softmax). The head is the largest matrix a check touches; the int8 copy
    moves a quarter of its bytes, and a pruned read k rows of it. The first check still sees the
    whole vocabulary's softmax: reading it through the k exact rows instead (the softmax of the k
    only) changes more exit decisions than the rounding does (`benchmarks/pruned_checks.py`).
    Only the exit decision is approximated: an exit's token is the argmax of the full-precision,
    full-vocabulary head at the exit layer.
    """

    def __init__(self, runner: LayerRunner, top_k: int) -> None:
        self.runner, self.top_k = runner, top_k
        self.rows: HeadRows | None = None  # the k head rows per running row, after the token's first read
        self.hidden: Tensor | None = None
        self.memo: Tensor | None = None

    def new_token(self) -> None:
        self.rows = None

    def at_layer(self, hidden: Tensor) -> None:
        self.hidden, self.memo = hidden, None

    def __call__(self) -> Tensor:
        if self.memo is None:
            if not self.top_k:
                self.memo = self.runner.logits(self.hidden)
            elif self.rows is None:
                self.memo = self.runner.approximate_logits(self.hidden).float()
                kept = self.memo[:, -1].topk(min(self.top_k, self.memo.shape[-1]), dim=-1).indices
                self.rows = self.runner.head_rows(kept)
            else:
                self.memo = self.runner.logits_for(self.hidden, self.rows)
        return self.memo

    def full_logits_read(self, leaving: slice | Tensor) -> Tensor | None:
        """The full-precision, full-vocabulary logits of the exiting rows `leaving` when this layer's
        check already read them; else None (the exit's token then needs a head read of its own)."""
        if self.memo is not None and not self.top_k:
            return self.memo[leaving]
        return None

    def select(self, keep: Tensor) -> None:
        if self.rows is not None:
            self.rows = self.rows.select(keep)


class EarlyExitDecode:
    """One early-exit generate call: its rows' tokens so far and the state that spans steps (the
    deferred K/V bookkeeping); `steps` runs the call, `token` decides one step's tokens."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        runner, policy, measure = decode.runner, decode.policy, decode.measure
        batch, device = decode.last_tokens.shape[0], runner.device
        self.batch, self.num_layers = batch, runner.num_layers
        self.checks = CheckLogits(runner, policy.vocab_top_k)
        self.deferred = policy.kv_strategy == "deferred" and measure.can_exit
        self.done_layers = torch.full(
            (batch, decode.max_new_tokens), runner.num_layers, dtype=torch.long, device=device
        )
        self.pending_states = (
            torch.zeros(batch, decode.max_new_tokens, runner.hidden_size, dtype=runner.dtype, device=device)
            if self.deferred
            else None
        )
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.exit_layers: list[list[int]] = [[] for _ in range(batch)]
        self.confidences: list[list[float]] = [[] for _ in range(batch)]

    def steps(self) -> Steps[GenerationOutput]:
        """The call as a step generator: it yields after every generated token; `Truncate` thrown in at
        a yield ends it there with the tokens so far."""
        decode = self.decode
        last_tokens, stats = decode.last_tokens, decode.stats
        alive = torch.arange(self.batch, device=decode.runner.device)
        for step in range(decode.max_new_tokens):
            token, exit_layer, confidence = self.token(step, alive)
            finished = _record(
                alive,
                token,
                exit_layer,
                confidence,
                self.tokens,
                self.exit_layers,
                self.confidences,
                decode.is_finished,
            )
            last_tokens[alive] = token
            alive = alive[~finished]
            if alive.numel() == 0 or step + 1 == decode.max_new_tokens:
                break
            try:
                yield from decode.clock.pause()
            except Truncate:  # a timing baseline that has taken as many steps as its candidate
                break
        for row_layers in self.exit_layers:
            stats.exit_histogram.update(row_layers)
        stats.tokens = sum(len(row) for row in self.tokens)
        return GenerationOutput(self.tokens, self.exit_layers, self.confidences, stats)

    def token(self, step: int, alive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step `step` for the rows `alive`, layer by layer until each has exited: their tokens, exit
        layers and confidences (the measure's value where the row exited, or at its last check)."""
        decode, num_layers, batch = self.decode, self.num_layers, self.batch
        runner, policy, measure, cache, stats = decode.runner, decode.policy, decode.measure, decode.cache, decode.stats
        last_tokens, device, checks, deferred = decode.last_tokens, runner.device, self.checks, self.deferred
        done_layers, pending_states = self.done_layers, self.pending_states
        threshold = policy.threshold_at(step, decode.max_new_tokens)
        rows, slot = alive, torch.arange(alive.numel(), device=device)
        hidden = runner.embed(last_tokens[rows])[:, None]
        token = torch.zeros(rows.numel(), dtype=torch.long, device=device)
        exit_layer = torch.full_like(token, num_layers)
        confidence = torch.full(token.shape, float("nan"), device=device)
        measure.threshold = threshold
        measure.start(hidden, policy.min_exit_layer)
        checks.new_token()
        last_score = None  # the measure's latest values for the rows still running
        # (slots, states) whose token is still to be read: one head call for the whole step, not one
        # per exit layer (at batch > 1 the head, the largest matrix, is read once, not up to L times)
        unread: list[tuple[Tensor | slice, Tensor]] = []
        catching_up = deferred and step > 0 and bool((done_layers[rows, :step] < num_layers).any())
        # the prefill ran this step through every layer: its states are read back, its K/V are real
        prefilled = step == 0 and runner.prefills_first_step
        for index in range(num_layers):
            row_arg = active_rows(rows, batch)
            if catching_up:
                hidden, caught_up = _layer_with_catch_up(
                    runner, index, hidden, cache, rows, row_arg, step, done_layers, pending_states
                )
                stats.layer_positions += caught_up
            else:
                hidden = runner.layer(index, hidden, cache, row_arg, step, step)
            if not prefilled:
                stats.layer_positions += rows.numel()
            layer = index + 1
            if layer == num_layers:
                break
            checks.at_layer(hidden)
            measured = time.perf_counter()  # a check's cost: the measure and the decision it feeds
            score = measure.step(layer, hidden, checks)
            exits, exiting = (None, 0) if score is None else exit_decision(score, threshold)
            stats.measure_s += time.perf_counter() - measured
            if score is None:
                continue
            last_score = score
            if exiting == 0:
                continue
            everyone = exiting == rows.numel()  # always so at batch size 1: no indexing
            leaving = slice(None) if everyone else exits.nonzero().squeeze(1)
            exit_hidden = hidden if everyone else hidden[leaving]
            exit_logits = checks.full_logits_read(leaving)
            exit_slot = slot if everyone else slot[leaving]
            if exit_logits is not None:
                token[exit_slot] = exit_logits[:, -1].argmax(-1)
            else:
                unread.append((exit_slot, exit_hidden))
            exit_layer[exit_slot] = layer
            confidence[exit_slot] = (score if everyone else score[leaving]).float()
            if not prefilled:  # a prefilled step skipped no layer: nothing to copy or defer
                leaving_rows = rows if everyone else rows[leaving]
                if deferred:
                    done_layers[leaving_rows, step] = layer
                    pending_states[leaving_rows, step] = exit_hidden[:, 0]
                else:
                    runner.copy_skipped_kv(layer, exit_hidden, cache, leaving_rows, step)
            if everyone:
                rows = rows[:0]
                break
            staying = ~exits
            rows, slot, hidden, last_score = rows[staying], slot[staying], hidden[staying], score[staying]
            measure.select(staying)
            checks.select(staying)
        if rows.numel():
            unread.append((slot, hidden))
            if last_score is not None:
                confidence[slot] = last_score.float()
        if len(unread) == 1:
            token[unread[0][0]] = runner.logits(unread[0][1])[:, -1].argmax(-1)
        elif unread:
            slots, states = zip(*unread)
            token[torch.cat(slots)] = runner.logits(torch.cat(states))[:, -1].argmax(-1)
        return token, measure.finish(token, exit_layer, num_layers), confidence


def early_exit_steps(decode: Decode) -> Steps[GenerationOutput]:
    """The early-exit decoding strategy (see `EarlyExitDecode`)."""
    return EarlyExitDecode(decode).steps()


def _layer_with_catch_up(
    runner: LayerRunner,
    index: int,
    hidden: Tensor,
    cache: Any,
    rows: Tensor,
    row_arg: Tensor | None,
    step: int,
    done_layers: Tensor,
    pending_states: Tensor,
) -> tuple[Tensor, int]:
    """Run layer `index` for the current token together with every earlier token of the
    same row that exited before this layer, in one call with an explicit causal mask; the
    current token's output and how many earlier positions caught up."""
    pending = done_layers[rows, :step] == index
    counts = pending.sum(1)
    caught_up = int(counts.sum())
    if caught_up == 0:
        return runner.layer(index, hidden, cache, row_arg, step, step), 0
    width = int(counts.max()) + 1
    candidates = torch.arange(step, device=hidden.device).expand_as(pending)
    ordered = torch.where(pending, candidates, step).sort(dim=1).values[:, : width - 1]
    positions = torch.cat([ordered, ordered.new_full((rows.numel(), 1), step)], dim=1)
    is_pending = positions < step
    block_rows = rows[:, None].expand_as(positions)
    block = pending_states[block_rows, positions.clamp(max=step - 1)]
    block = torch.where(is_pending[..., None], block, hidden)
    block = runner.layer(index, block, cache, row_arg, positions, step)
    pending_states[block_rows[is_pending], positions[is_pending]] = block[is_pending]
    done_layers[block_rows[is_pending], positions[is_pending]] = index + 1
    return block[:, -1:], caught_up


def _record(
    alive: Tensor,
    token: Tensor,
    exit_layer: Tensor,
    confidence: Tensor,
    tokens: list[list[int]],
    exit_layers: list[list[int]],
    confidences: list[list[float]],
    is_finished: Callable[[list[int]], bool],
) -> Tensor:
    """Append this step's results per row; return which rows are now finished."""
    finished = []
    for row, tok, layer, conf in zip(alive.tolist(), token.tolist(), exit_layer.tolist(), confidence.tolist()):
        tokens[row].append(tok)
        exit_layers[row].append(layer)
        confidences[row].append(conf)
        finished.append(is_finished(tokens[row]))
    return torch.tensor(finished, dtype=torch.bool, device=alive.device)
