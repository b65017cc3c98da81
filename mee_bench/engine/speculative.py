"""Lossless self-speculative decoding: draft with the first layers, verify with the rest.

The first E decoder layers (E = the policy's `min_exit_layer`) draft tokens one position at
a time while the policy's measure is confident at layer E (`fixed`: always), up to
`max_draft` proposals; then the remaining layers run every drafted position of every row in
one parallel pass from their layer-E states, and each row keeps the longest drafted prefix
the full model agrees with plus the full model's own next token. Every emitted token is
the full model's, so the output is `full`'s token for token (LayerSkip's self-speculation,
Elhoushi et al. 2024, over the runner protocol).

A runner whose prefill ran step 0 (`prefills_first_step`) emits step 0's token from its stored
last-layer state, and drafting starts at step 1.

The cache is preallocated by position: a rejected position's shallow and deep K/V stay in
place until the next round drafts that position again and overwrites them, before any query
can see them (the causal mask hides the positions ahead of each query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import torch
from torch import Tensor

from mee_bench.engine.generation import Decode, GenerationOutput, SpeculationCounts
from mee_bench.engine.measures import ExitMeasure
from mee_bench.engine.policy import ExitPolicy, exit_decision
from mee_bench.engine.runner import LayerRunner, active_rows
from mee_bench.engine.steps import Steps


@dataclass
class SpeculativeOutput:
    tokens: list[list[int]]  # generated ids per row, EOS included when produced
    counts: SpeculationCounts = field(default_factory=SpeculationCounts)


def _position_arg(positions: list[int], device: torch.device) -> tuple[Tensor | int, int]:
    """The runner's `positions` argument for one query per row: an int when all rows agree."""
    last = max(positions)
    if min(positions) == last:
        return last, last
    return torch.tensor(positions, device=device)[:, None], last


def self_speculative_steps(decode: Decode) -> Steps[GenerationOutput]:
    """The self-speculative decoding strategy: every emitted token is the full model's (exit layer L,
    no confidence), with the drafting and verification counts in the call's stats."""
    drafted = yield from decode.clock.relay(
        self_speculative_generate(
            decode.runner,
            decode.cache,
            decode.last_tokens,
            decode.policy,
            decode.measure,
            decode.max_new_tokens,
            decode.is_finished,
        )
    )
    stats, num_layers = decode.stats, decode.runner.num_layers
    stats.speculation, stats.layer_positions = drafted.counts, drafted.counts.layer_positions
    stats.tokens = sum(len(row) for row in drafted.tokens)
    stats.exit_histogram.update({num_layers: stats.tokens})
    exit_layers = [[num_layers] * len(row) for row in drafted.tokens]
    confidences = [[float("nan")] * len(row) for row in drafted.tokens]
    return GenerationOutput(drafted.tokens, exit_layers, confidences, stats)


def self_speculative_generate(
    runner: LayerRunner,
    cache: Any,
    first_tokens: Tensor,
    policy: ExitPolicy,
    measure: ExitMeasure,
    max_new_tokens: int,
    is_finished: Callable[[list[int]], bool],
) -> Generator[None, None, SpeculativeOutput]:
    """Greedy tokens of the full model for every row, drafted by its first `policy.min_exit_layer`
    layers and verified by the rest; `is_finished(tokens)` ends a row (EOS, stop strings). A
    generator that yields after every draft-and-verify round (a step of `decode_steps`)."""
    num_layers, draft_depth = runner.num_layers, policy.min_exit_layer
    batch, device = first_tokens.shape[0], runner.device
    draft_states = torch.zeros(batch, policy.max_draft + 1, 1, runner.hidden_size, dtype=runner.dtype, device=device)
    output = SpeculativeOutput([[] for _ in range(batch)])
    tokens, counts = output.tokens, output.counts
    next_input = first_tokens.clone()
    alive = list(range(batch))
    if runner.prefills_first_step:  # the prefill ran step 0 through every layer: its token is the full model's
        state = runner.layer(num_layers - 1, runner.embed(first_tokens)[:, None], cache, None, 0, 0)
        next_input = runner.logits(state)[:, -1].argmax(-1)
        for row, token in enumerate(next_input.tolist()):
            tokens[row].append(token)
        alive = [row for row in alive if not is_finished(tokens[row]) and max_new_tokens > 1]

    while alive:
        lengths = [len(tokens[row]) for row in alive]  # the position of each row's next input
        room = [min(policy.max_draft, max_new_tokens - 1 - n) for n in lengths]  # proposals allowed
        proposals: list[list[int]] = [[] for _ in alive]
        verified = [0] * len(alive)  # positions each row runs through verification
        drafting = list(range(len(alive)))  # slots into `alive`
        inputs = next_input[alive]
        for offset in range(policy.max_draft + 1):
            rows = torch.tensor([alive[s] for s in drafting], device=device)
            row_arg = active_rows(rows, batch)
            positions, last = _position_arg([lengths[s] + offset for s in drafting], device)
            hidden = runner.embed(inputs)[:, None]
            measure.start(hidden, draft_depth)
            for index in range(draft_depth):
                hidden = runner.layer(index, hidden, cache, row_arg, positions, last)
                if index + 1 < draft_depth:
                    measure.step(index + 1, hidden, lambda states=hidden: runner.logits(states))
            counts.layer_positions += draft_depth * len(drafting)
            draft_states[rows, offset] = hidden
            for s in drafting:
                verified[s] = offset + 1
            can_propose = [offset < room[s] for s in drafting]
            if not any(can_propose):
                break
            memo: list[Tensor] = []

            def draft_logits(states: Tensor = hidden) -> Tensor:
                if not memo:
                    memo.append(runner.logits(states))
                return memo[0]

            score = measure.step(draft_depth, hidden, draft_logits)
            if score is None:  # no score yet at the draft layer (the monotonic heuristic's three layers): no proposal
                break
            threshold = [policy.threshold_at(lengths[s] + offset, max_new_tokens) for s in drafting]
            exits, exiting = exit_decision(score, threshold)
            confident = [bool(exiting)] if exits is None else exits.tolist()
            proposing = [i for i in range(len(drafting)) if can_propose[i] and confident[i]]
            if not proposing:
                break
            # the draft head only for the rows that propose (unless the measure read it already)
            everyone = len(proposing) == len(drafting)
            chosen = slice(None) if everyone else torch.tensor(proposing, device=device)
            drafted = (memo[0][chosen] if memo else runner.logits(hidden[chosen]))[:, -1].argmax(-1)
            still_drafting, kept = [], []
            for j, (i, token) in enumerate(zip(proposing, drafted.tolist())):
                proposals[drafting[i]].append(token)
                if token != runner.eos_token_id:
                    still_drafting.append(drafting[i])
                    kept.append(j)
            if not still_drafting:
                break
            inputs = drafted if len(kept) == len(drafted) else drafted[torch.tensor(kept, device=device)]
            drafting = still_drafting

        predicted = _verify(runner, cache, alive, lengths, verified, draft_states, draft_depth, batch)
        counts.layer_positions += (num_layers - draft_depth) * sum(verified)
        still_alive = []
        for s, row in enumerate(alive):
            full = predicted[s][: verified[s]]
            matching = next((i for i, (p, f) in enumerate(zip(proposals[s], full)) if p != f), len(proposals[s]))
            emitted = full[: min(matching + 1, verified[s])]
            counts.rounds += 1
            counts.proposed += len(proposals[s])
            counts.accepted += min(matching, len(emitted))
            finished = False
            for token in emitted:
                tokens[row].append(token)
                finished = is_finished(tokens[row])
                if finished:
                    break
            next_input[row] = tokens[row][-1]
            if not finished and len(tokens[row]) < max_new_tokens:
                still_alive.append(row)
        alive = still_alive
        if alive:
            yield
    return output


def _verify(
    runner: LayerRunner,
    cache: Any,
    alive: list[int],
    lengths: list[int],
    verified: list[int],
    draft_states: Tensor,
    draft_depth: int,
    batch: int,
) -> list[list[int]]:
    """The full model's next token after each drafted position: the deep layers over all of a
    row's drafted positions in one call (rows with fewer positions repeat their last one, which
    computes and writes identical values), then the head."""
    device = draft_states.device
    width = max(verified)
    rows = torch.tensor(alive, device=device)
    offsets = torch.minimum(
        torch.arange(width, device=device)[None, :], torch.tensor(verified, device=device)[:, None] - 1
    )
    positions = torch.tensor(lengths, device=device)[:, None] + offsets
    last = max(n + k - 1 for n, k in zip(lengths, verified))
    hidden = draft_states[rows[:, None], offsets, 0]
    row_arg = active_rows(rows, batch)
    if len(alive) == 1 and width == 1:
        positions = lengths[0]
    for index in range(draft_depth, runner.num_layers):
        hidden = runner.layer(index, hidden, cache, row_arg, positions, last)
    return runner.logits(hidden).argmax(-1).tolist()
