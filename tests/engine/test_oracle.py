"""The oracle rule: one function, and the `oracle` measure agrees with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mee_bench.engine.measures import Oracle
from mee_bench.engine.oracle import top1_unchanged_after


def test_top1_unchanged_after_by_hand():
    top1 = torch.tensor([[5, 1], [7, 2], [7, 2], [7, 3]])  # 4 layers x 2 tokens
    assert top1_unchanged_after(top1).int().tolist() == [[0, 0], [1, 0], [1, 0], [1, 1]]


def test_the_oracle_measure_exits_at_the_first_checked_layer_where_the_rule_holds():
    layers, tokens, first_check = 6, 200, 2
    top1 = torch.randint(0, 3, (layers, tokens), generator=torch.Generator().manual_seed(0))  # 3 ids: many flips
    oracle = Oracle()
    oracle.start(torch.zeros(tokens, 1, 4), first_check)
    for layer in range(1, layers):  # the loop checks every layer but the last
        logits = F.one_hot(top1[layer - 1], 3).float()[:, None, :]
        oracle.step(layer, torch.zeros(tokens, 1, 4), lambda: logits)
    unchanged = top1_unchanged_after(top1)
    first_unchanged = unchanged.int().argmax(0) + 1  # the rule, once true, stays true to the last layer
    expected = first_unchanged.clamp(min=first_check)
    assert torch.equal(oracle.finish(top1[-1], torch.full_like(top1[-1], layers), layers), expected)
    assert 1 < len(set(expected.tolist()))  # the random ids exercise several exit layers
