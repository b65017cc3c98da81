"""Learn-then-Test statistics: the p-value against independent computations, fixed-sequence
testing's order, the guarantee in simulation, and the errors for inputs it cannot use."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mee_bench.calibrate.ltt import (
    CalibrationError,
    check_calibration_size,
    check_grid_order,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    minimum_calibration_size,
)


def exact_binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def kl(a: float, b: float) -> float:
    first = 0.0 if a == 0 else a * math.log(a / b)
    second = 0.0 if a == 1 else (1 - a) * math.log((1 - a) / (1 - b))
    return first + second


@pytest.mark.parametrize(
    "risk, n, delta",
    [(0.0, 50, 0.1), (0.02, 100, 0.1), (0.05, 200, 0.1), (0.13, 40, 0.2), (0.07, 300, 0.05), (0.5, 20, 0.3)],
)
def test_pvalue_matches_exact_sums(risk, n, delta):
    hoeffding = math.exp(-n * kl(min(risk, delta), delta))
    bentkus = math.e * exact_binomial_cdf(math.ceil(round(n * risk, 9)), n, delta)
    assert hoeffding_bentkus_pvalue(risk, n, delta) == pytest.approx(min(1.0, hoeffding, bentkus), rel=1e-9)


def test_zero_risk_gives_one_minus_delta_to_the_n():
    # R = 0: Hoeffding gives exp(n log(1 - delta)) = (1 - delta)^n, Bentkus e (1 - delta)^n.
    assert hoeffding_bentkus_pvalue(0.0, 30, 0.1) == pytest.approx(0.9**30, rel=1e-12)


@pytest.mark.parametrize("risk", [0.1, 0.15, 0.6, 1.0])
def test_risk_at_or_above_delta_is_never_significant(risk):
    assert hoeffding_bentkus_pvalue(risk, 500, 0.1) == 1.0


def test_bentkus_term_wins_for_small_risk_and_large_n():
    risk, n, delta = 0.05, 200, 0.1
    hoeffding = math.exp(-n * kl(risk, delta))
    bentkus = math.e * exact_binomial_cdf(10, n, delta)
    assert bentkus < hoeffding
    assert hoeffding_bentkus_pvalue(risk, n, delta) == pytest.approx(bentkus, rel=1e-9)


def test_fixed_sequence_stops_at_first_failure_and_never_skips_ahead():
    thresholds = [0.9, 0.8, 0.7, 0.6, 0.5]
    risks = [0.0, 0.01, 0.2, 0.0, 0.0]  # the third point fails; the later, easy ones must not be rejected
    tests, chosen = fixed_sequence_test(thresholds, risks, n=400, delta=0.1, epsilon=0.1)
    assert [t.rejected for t in tests] == [True, True, False, False, False]
    assert [t.tested for t in tests] == [True, True, True, False, False]
    assert tests[3].p_value <= 0.1  # significant on its own, yet not rejected
    assert chosen == 1


def test_nothing_rejected_means_no_threshold():
    tests, chosen = fixed_sequence_test([0.9, 0.5], [0.3, 0.0], n=400, delta=0.1, epsilon=0.1)
    assert chosen is None
    assert not any(t.rejected for t in tests)


def test_guarantee_holds_over_random_calibration_draws():
    """Known risk curve; over many draws the chosen threshold's true risk exceeds delta in at
    most epsilon of them (plus sampling slack), while picking by empirical risk alone does not."""
    rng = np.random.default_rng(0)
    delta, epsilon, n, draws = 0.1, 0.1, 100, 2000
    true_risks = np.linspace(0.0, 0.3, 13)  # grid from most to least conservative
    thresholds = list(np.linspace(0.95, 0.35, 13))
    ltt_violations = naive_violations = 0
    for _ in range(draws):
        u = rng.random(n)
        empirical = [(u < r).mean() for r in true_risks]  # nested losses, as real thresholds give
        _, chosen = fixed_sequence_test(thresholds, empirical, n, delta, epsilon)
        ltt_violations += chosen is not None and true_risks[chosen] > delta
        naive = max(i for i, r in enumerate(empirical) if r <= delta) if empirical[0] <= delta else None
        naive_violations += naive is not None and true_risks[naive] > delta
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / draws)
    assert ltt_violations / draws <= epsilon + slack
    assert naive_violations / draws > epsilon + slack  # the check has teeth


@pytest.mark.parametrize("grid", [[], [0.5, 0.7], [0.9, 0.9, 0.5]])
def test_grid_must_be_non_empty_and_strictly_decreasing(grid):
    with pytest.raises(CalibrationError, match="threshold grid|empty"):
        check_grid_order(grid)


@pytest.mark.parametrize("name, value", [("delta", 0.0), ("delta", 1.0), ("epsilon", -0.1), ("epsilon", 1.5)])
def test_levels_outside_zero_one_are_refused(name, value):
    levels = {"delta": 0.1, "epsilon": 0.1, name: value}
    with pytest.raises(CalibrationError, match=f"{name}=.*strictly between 0 and 1"):
        fixed_sequence_test([0.9], [0.0], 100, levels["delta"], levels["epsilon"])


def test_calibration_set_too_small_for_the_bound():
    needed = minimum_calibration_size(0.1, 0.05)
    assert 0.9**needed <= 0.05 < 0.9 ** (needed - 1)
    check_calibration_size(needed, 0.1, 0.05)
    with pytest.raises(CalibrationError, match=f"at least {needed} calibration examples"):
        check_calibration_size(needed - 1, 0.1, 0.05)
