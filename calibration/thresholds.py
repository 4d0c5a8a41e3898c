"""Thresholds from data: the image threshold's policies and the pixel threshold.

A part is NG when its image score is at or above the image threshold. Three policies:

- "quantile": the q-quantile of the good scores (needs many good images for a small
  false-reject rate; it never goes beyond the largest good score seen).
- "tail": a generalized Pareto fit to the upper tail of the good scores (peaks over
  threshold), so small false-reject targets extrapolate beyond the sample.
- "f1": the score that maximises F1 on good plus defect scores (needs labelled defects).

The pixel threshold, which cuts regions and sets heatmap colours, is a high quantile of the
score-map values of held-out good images (``pixel_threshold``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from calibration.metrics import f1_max_threshold
from engines.settings import Settings

__all__ = [
    "ThresholdConfig",
    "ThresholdResult",
    "choose_threshold",
    "f1_max_threshold",
    "pixel_threshold",
    "quantile_threshold",
    "tail_fit_threshold",
]

Policy = Literal["quantile", "tail", "f1"]
POLICIES = ("quantile", "tail", "f1")

# The tail is the top 10 % of the good scores, but never fewer than 20 of them: fewer
# exceedances leave the Pareto shape estimate dominated by noise.
_TAIL_FRACTION = 0.1
_MIN_EXCEEDANCES = 20
# Below this many good scores the Pareto fit is not attempted (see _exponential_tail).
_MIN_SAMPLES_FOR_PARETO = 2 * _MIN_EXCEEDANCES
_MIN_SAMPLES = 10


class ThresholdConfig(Settings):
    policy: Policy = Field("quantile", description="quantile | tail (fits the upper tail, targets "
                                                   "false_reject_rate) | f1 (needs defects)")
    quantile: float = Field(0.995, gt=0.0, le=1.0, description="quantile policy: share of good images that "
                                                               "must pass")
    false_reject_rate: float = Field(0.005, gt=0.0, lt=1.0, description="tail policy: target share of good "
                                                                        "parts rejected")
    pixel_quantile: float = Field(0.999, gt=0.0, le=1.0, description="pixel threshold (regions, heatmap "
                                                                     "mid-scale): this quantile of the held-out "
                                                                     "good images' score-map values")


@dataclass
class ThresholdResult:
    """The chosen threshold and how it does on the scores it was chosen from."""

    threshold: float
    policy: Policy
    false_reject_rate: float  # fraction of the given good scores at or above the threshold
    miss_rate: float | None = None  # fraction of the given defect scores below it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantile_threshold(good_scores: np.ndarray, q: float) -> float:
    """The q-quantile of the good scores (linear interpolation between order statistics)."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile q must be in (0, 1], got {q}")
    return float(np.quantile(_as_scores(good_scores), q))


def tail_fit_threshold(good_scores: np.ndarray, false_reject_rate: float) -> float:
    """The score that a fraction `false_reject_rate` of good parts would reach or exceed.

    Peaks over threshold: a generalized Pareto distribution is fitted to the excesses of
    the top scores over the highest score below them, then inverted at the target rate, so
    targets below 1/n extrapolate beyond the largest good score. Targets inside the sample's
    body use the empirical quantile. With fewer than 40 good scores the tail shape cannot
    be estimated and an exponential tail (Pareto shape 0) over the top half is used instead;
    for light-tailed scores that errs towards a higher threshold (fewer false rejects).
    """
    scores = np.sort(_as_scores(good_scores))
    if not 0 < false_reject_rate < 1:
        raise ValueError(f"false_reject_rate must be in (0, 1), got {false_reject_rate}")
    if scores.size < _MIN_SAMPLES:
        raise ValueError(
            f"tail_fit_threshold needs at least {_MIN_SAMPLES} good scores, got {scores.size}"
        )
    if scores.size < _MIN_SAMPLES_FOR_PARETO:
        n_tail = scores.size // 2
    else:
        n_tail = max(_MIN_EXCEEDANCES, math.ceil(_TAIL_FRACTION * scores.size))
    tail_probability = n_tail / scores.size
    if false_reject_rate >= tail_probability:
        return float(np.quantile(scores, 1 - false_reject_rate))

    base = scores[-n_tail - 1]
    excesses = scores[-n_tail:] - base
    if np.ptp(excesses) == 0:
        return float(scores[-1])  # a flat tail holds no information about its spread
    exceedance = false_reject_rate / tail_probability
    if scores.size < _MIN_SAMPLES_FOR_PARETO:
        return float(base + excesses.mean() * math.log(1 / exceedance))
    from scipy import stats  # here, not at import: the configuration is read without scipy

    shape, _, scale = stats.genpareto.fit(excesses, floc=0)
    return float(base + stats.genpareto.isf(exceedance, shape, loc=0, scale=scale))


def pixel_threshold(good_maps: list[np.ndarray], quantile: float, max_values: int = 2_000_000) -> float:
    """The ``quantile`` of the good score maps' values (an even subsample of at most ``max_values``)."""
    values = np.concatenate([np.asarray(m, np.float32).ravel() for m in good_maps])
    values = values[:: max(1, values.size // max_values)]
    return float(np.quantile(_as_scores(values, "good pixel scores"), quantile))


def choose_threshold(
    cfg: ThresholdConfig, good_scores: np.ndarray, defect_scores: np.ndarray | None = None
) -> ThresholdResult:
    good = _as_scores(good_scores, "good_scores")
    defects = None if defect_scores is None else _as_scores(defect_scores, "defect_scores")
    if cfg.policy == "quantile":
        threshold = quantile_threshold(good, cfg.quantile)
    elif cfg.policy == "tail":
        threshold = tail_fit_threshold(good, cfg.false_reject_rate)
    else:
        if defects is None:
            raise ValueError(
                "threshold policy 'f1' needs defect_scores (scores of defective images); got none"
            )
        scores = np.concatenate([good, defects])
        labels = np.concatenate([np.zeros(good.size, int), np.ones(defects.size, int)])
        threshold, _ = f1_max_threshold(scores, labels)
    return ThresholdResult(
        threshold=threshold,
        policy=cfg.policy,
        false_reject_rate=float(np.mean(good >= threshold)),
        miss_rate=None if defects is None else float(np.mean(defects < threshold)),
    )


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} hold NaN or infinite values")
    return values
