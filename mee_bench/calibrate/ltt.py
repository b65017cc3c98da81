"""Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing, as CALM section 4 uses it.

Notation here: `delta` is the risk tolerance and `epsilon` the failure probability, so the
guarantee reads P[risk(chosen threshold) <= delta] >= 1 - epsilon over the calibration draw.
(The LTT paper calls the tolerance alpha and the failure probability delta; CALM calls them
delta and epsilon, as here.) Each grid point j carries the null hypothesis H_j: risk_j > delta.
Its Hoeffding-Bentkus p-value is valid for losses in [0, 1]; testing the H_j in a fixed order,
most conservative first, and stopping at the first one not rejected controls the family-wise
error at epsilon without any correction. Pure functions: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Sequence

from scipy.special import xlogy
from scipy.stats import binom


class CalibrationError(ValueError):
    """Inputs that Learn-then-Test cannot certify anything from; the message says what to change."""


def check_level(name: str, value: float) -> None:
    """`delta` and `epsilon` are probabilities strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise CalibrationError(f"{name}={value!r} must lie strictly between 0 and 1, e.g. {name}=0.1")


def h1(a: float, b: float) -> float:
    """The Bernoulli KL divergence a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0."""
    return float(xlogy(a, a / b) + xlogy(1.0 - a, (1.0 - a) / (1.0 - b)))


def hoeffding_bentkus_pvalue(risk: float, n: int, delta: float) -> float:
    """p-value of H: true risk > delta, from the empirical risk `risk` of n losses in [0, 1].

    min(exp(-n h1(min(R, delta), delta)), e * P[Binomial(n, delta) <= ceil(n R)]), capped at 1.
    """
    if n < 1:
        raise CalibrationError("the calibration set is empty; give it at least one example")
    if not 0.0 <= risk <= 1.0:
        raise CalibrationError(f"empirical risk {risk!r} is outside [0, 1]; losses must lie in [0, 1]")
    check_level("delta", delta)
    hoeffding = math.exp(-n * h1(min(risk, delta), delta))
    successes = math.ceil(round(n * risk, 9))  # n * R is an integer up to float noise for 0/1 losses
    bentkus = math.e * float(binom.cdf(successes, n, delta))
    return min(1.0, hoeffding, bentkus)


def smallest_pvalue(n: int, delta: float) -> float:
    """The p-value of a perfect calibration set (R = 0): nothing can be certified below it."""
    return hoeffding_bentkus_pvalue(0.0, n, delta)


def minimum_calibration_size(delta: float, epsilon: float) -> int:
    """The smallest n for which R = 0 reaches p <= epsilon; (1 - delta)^n <= epsilon."""
    check_level("delta", delta)
    check_level("epsilon", epsilon)
    n = max(1, math.ceil(math.log(epsilon) / math.log1p(-delta)))
    while smallest_pvalue(n, delta) > epsilon:
        n += 1
    return n


def check_calibration_size(n: int, delta: float, epsilon: float) -> None:
    needed = minimum_calibration_size(delta, epsilon)
    if n < needed:
        raise CalibrationError(
            f"a calibration set of {n} examples cannot certify any threshold at delta={delta}, epsilon={epsilon}: "
            f"even zero observed risk gives p={smallest_pvalue(n, delta):.3g} > epsilon; "
            f"use at least {needed} calibration examples or raise delta/epsilon"
        )


def check_grid_order(thresholds: Sequence[float]) -> None:
    """A grid must run from most to least conservative: strictly decreasing thresholds
    (a higher threshold exits less often, for every measure the project ships)."""
    if not thresholds:
        raise CalibrationError(
            "empty threshold grid; list thresholds from most to least conservative, e.g. [0.9, 0.7, 0.5]"
        )
    for earlier, later in pairwise(thresholds):
        if not later < earlier:
            raise CalibrationError(
                f"threshold grid {list(thresholds)} is not ordered from most to least conservative "
                f"({earlier} is followed by {later}); list strictly decreasing thresholds, e.g. "
                f"{sorted(set(thresholds), reverse=True)}"
            )


@dataclass(frozen=True)
class GridTest:
    """One grid point's test: its empirical risk, p-value and whether H: risk > delta was rejected."""

    threshold: float
    risk: float
    p_value: float
    rejected: bool
    tested: bool  # False once fixed-sequence testing has stopped before this point


def fixed_sequence_test(
    thresholds: Sequence[float], risks: Sequence[float], n: int, delta: float, epsilon: float
) -> tuple[list[GridTest], int | None]:
    """Test each grid point in order, rejecting while p <= epsilon; stop at the first failure.

    Returns every point's test and the index of the chosen one: the last rejected, or None
    when the first point already fails (then the only certified policy is never to exit).
    Points after the first failure are never rejected, whatever their p-values.
    """
    check_level("delta", delta)
    check_level("epsilon", epsilon)
    if len(thresholds) != len(risks):
        raise CalibrationError(f"{len(thresholds)} thresholds but {len(risks)} risks; give one risk per threshold")
    tests: list[GridTest] = []
    chosen: int | None = None
    testing = True
    for index, (threshold, risk) in enumerate(zip(thresholds, risks)):
        p_value = hoeffding_bentkus_pvalue(risk, n, delta)
        rejected = testing and p_value <= epsilon
        tests.append(GridTest(float(threshold), float(risk), p_value, rejected, tested=testing))
        if rejected:
            chosen = index
        else:
            testing = False
    return tests, chosen
