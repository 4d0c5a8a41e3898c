"""Threshold policies and the score normalizer."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from calibration.thresholds import (
    ThresholdConfig,
    ThresholdResult,
    choose_threshold,
    f1_max_threshold,
    quantile_threshold,
    tail_fit_threshold,
)


def test_quantile_threshold_is_exact_on_known_data() -> None:
    scores = np.arange(101, dtype=float)  # 0..100: the q-quantile is 100 q
    assert quantile_threshold(scores, 0.99) == pytest.approx(99.0)
    assert quantile_threshold(scores, 0.995) == pytest.approx(99.5)
    assert quantile_threshold(np.array([3.0, 1.0, 2.0]), 1.0) == 3.0
    with pytest.raises(ValueError, match="q must be in"):
        quantile_threshold(scores, 0.0)


@pytest.mark.parametrize(
    "distribution", [stats.expon(), stats.norm(loc=5, scale=2), stats.t(df=5)], ids=str
)
def test_tail_fit_gets_the_order_of_magnitude_of_a_small_rate(distribution) -> None:
    sample = distribution.rvs(size=1000, random_state=np.random.default_rng(11))
    threshold = tail_fit_threshold(sample, 1e-3)
    # The true rate at the fitted threshold, from the known distribution.
    assert 1e-4 < distribution.sf(threshold) < 1e-2


def test_tail_fit_extrapolates_beyond_the_sample() -> None:
    distribution = stats.expon()
    sample = distribution.rvs(size=500, random_state=np.random.default_rng(5))
    threshold = tail_fit_threshold(sample, 1e-4)
    # An empirical quantile can never exceed the largest score; the fitted tail must.
    assert threshold > sample.max()
    assert quantile_threshold(sample, 1 - 1e-4) <= sample.max()
    assert 1e-5 < distribution.sf(threshold) < 1e-3


def test_tail_fit_uses_the_empirical_quantile_inside_the_sample() -> None:
    sample = np.random.default_rng(2).normal(size=1000)
    assert tail_fit_threshold(sample, 0.2) == pytest.approx(np.quantile(sample, 0.8))


def test_tail_fit_fallback_on_few_samples_still_extrapolates() -> None:
    distribution = stats.expon()
    sample = distribution.rvs(size=25, random_state=np.random.default_rng(4))
    threshold = tail_fit_threshold(sample, 1e-3)
    assert threshold > sample.max()
    # 25 scores pin the tail down loosely: a factor of 10 either way (here 4e-5).
    assert 1e-5 < distribution.sf(threshold) < 1e-2
    with pytest.raises(ValueError, match="at least 10 good scores, got 5"):
        tail_fit_threshold(sample[:5], 1e-3)


def test_tail_fit_of_a_flat_tail_is_its_value() -> None:
    sample = np.concatenate([np.linspace(0, 1, 100), np.ones(50)])
    assert tail_fit_threshold(sample, 1e-3) == 1.0


def test_f1_max_threshold_hand_case() -> None:
    threshold, f1 = f1_max_threshold(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0, 0, 1, 1]))
    assert (threshold, f1) == (pytest.approx(0.3), pytest.approx(1.0))
    # A defect scored below both good parts: stopping at 0.3 (F1 4/5) beats reaching down
    # to 0.05 (F1 6/8, two good parts rejected on the way).
    scores, labels = np.array([0.1, 0.2, 0.3, 0.9, 0.05]), np.array([0, 0, 1, 1, 1])
    threshold, f1 = f1_max_threshold(scores, labels)
    assert threshold == pytest.approx(0.3)
    assert f1 == pytest.approx(4 / 5)


def test_choose_threshold_reports_rates_on_the_given_scores() -> None:
    good = np.arange(1, 201, dtype=float)  # 1..200
    defects = np.array([150.0, 199.5, 250.0, 300.0])
    result = choose_threshold(ThresholdConfig(policy="quantile", quantile=0.99), good, defects)
    assert isinstance(result, ThresholdResult)
    assert result.threshold == pytest.approx(np.quantile(good, 0.99))  # 198.01
    assert result.false_reject_rate == pytest.approx(2 / 200)  # 199 and 200
    assert result.miss_rate == pytest.approx(1 / 4)  # 150
    assert result.to_dict()["policy"] == "quantile"
    assert choose_threshold(ThresholdConfig(), good).miss_rate is None


def test_choose_threshold_tail_and_f1_policies() -> None:
    rng = np.random.default_rng(0)
    good = rng.exponential(size=400)
    tail = choose_threshold(ThresholdConfig(policy="tail", false_reject_rate=1e-4), good)
    assert tail.threshold > good.max() and tail.false_reject_rate == 0.0

    defects = np.array([2.5, 8.0, 9.0, 10.0])
    f1 = choose_threshold(ThresholdConfig(policy="f1"), good, defects)
    expected, _ = f1_max_threshold(
        np.concatenate([good, defects]), np.r_[np.zeros(good.size), np.ones(defects.size)]
    )
    assert f1.threshold == expected
    with pytest.raises(ValueError, match="'f1' needs defect_scores"):
        choose_threshold(ThresholdConfig(policy="f1"), good)


def test_threshold_config_names_bad_values() -> None:
    with pytest.raises(ValueError, match="policy"):
        ThresholdConfig(policy="median")
    with pytest.raises(ValueError, match="false_reject_rate"):
        ThresholdConfig(policy="tail", false_reject_rate=0.0)
