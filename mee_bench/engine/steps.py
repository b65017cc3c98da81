"""Decoding as step generators: a decode yields after every generated step, so that a timer can run
two decodes in turn, token by token (lockstep pairing, docs/TIMING.md), and stop a baseline where its
candidate stopped (`Truncate`). The engine owns this protocol; the timing module drives it.
"""

from __future__ import annotations

import time
from typing import Generator, TypeVar


class Truncate(Exception):
    """Thrown into a decode's step generator at a yield: a decode that supports it (`decode_steps`)
    stops there and returns what it has so far."""


Result = TypeVar("Result")
Steps = Generator[None, None, Result]


def run_steps(steps: Steps[Result]) -> Result:
    """Run a step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class ActiveClock:
    """`time.perf_counter` less the time a step generator spent suspended at its yields, so that a
    decode's own figures (encoder, decoder, measure time) leave out whatever ran in between."""

    def __init__(self) -> None:
        self.paused_s = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.paused_s

    def pause(self) -> Steps[None]:
        """Yield once, not counting the suspension."""
        suspended = time.perf_counter()
        try:
            yield
        finally:  # also when `Truncate` is thrown in
            self.paused_s += time.perf_counter() - suspended

    def relay(self, steps: Steps[Result]) -> Steps[Result]:
        """Run `steps` to its result, pausing at each of its yields."""
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value
            yield from self.pause()
