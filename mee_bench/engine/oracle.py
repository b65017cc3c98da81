"""The oracle's rule, once: a token may exit at layer i iff its top-1 never changes after layer i.

The monotonicity study counts it, exit-head training uses it as labels, and the `oracle`
measure reports the first layer where it holds; all of them read this one function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top1_unchanged_after(top1: Tensor) -> Tensor:
    """[L, N] top-1 ids (layer 1 first) -> [L, N] bool: the top-1 at layer i equals the top-1 at every later layer."""
    same_as_next = torch.ones_like(top1, dtype=torch.bool)
    same_as_next[:-1] = top1[:-1] == top1[1:]
    return same_as_next.flip(0).int().cumprod(0).flip(0).bool()
