"""How numbers look in every table the project writes: one marker for a missing value, fixed rules for digits.

Shared by the sweep's leaderboard and the study's reports, so the same figure never prints two ways.
"""

from __future__ import annotations

import math

MISSING = "n/a"


def fixed(value: float | None, digits: int = 2) -> str:
    """`digits` decimals (quality, exit layers, ms/token), or MISSING."""
    return MISSING if value is None else f"{value:.{digits}f}"


def significant(value: float | None, digits: int = 3) -> str:
    """`digits` significant figures, for values spanning magnitudes (thresholds, Wh, grams), or MISSING."""
    return MISSING if value is None else f"{value:.{digits}g}"


def percent(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage; None and NaN (a ratio with nothing to divide) are MISSING."""
    return MISSING if fraction is None or math.isnan(fraction) else f"{100 * fraction:.{digits}f}%"
