"""Calibration settings: the ``model:`` section of the configuration, how a bundle is fitted.

``ModelConfig`` is the model itself (``engines.model.ModelSpec``: method and its settings,
backbone, taps, input, blur, tiling, mask; the same model validates the bundle manifest) plus
what only fitting needs.
"""
from __future__ import annotations

from pydantic import Field

from calibration.thresholds import ThresholdConfig
from engines.model import ModelSpec
from engines.settings import ConfigPath

__all__ = ["ModelConfig"]


class ModelConfig(ModelSpec):
    weights: ConfigPath | None = Field(None, description="torchvision-format .pth state dict; required for the "
                                                         "ResNets")
    batch_size: int = Field(8, ge=1, description="images (or tiles) per forward pass while fitting")
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="share of train/good held out of the fit to set the "
                                                            "thresholds (and to stop training)")
    seed: int = Field(0, description="fixes the channel subset, the hold-out split and any training")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig,
                                       description="thresholds, from the held-out good images")
    validation_defects: int = Field(60, ge=0, description="trained methods: synthetic defects made from held-out "
                                                          "good images; training stops on how well it finds them "
                                                          "among the held-out good ones (0: on its loss instead)")
    synthetic_defects: int = Field(0, ge=0, description="defective images made from held-out good ones: "
                                                        "miss-rate estimate, and f1 thresholds without real defects")

    def spec(self) -> ModelSpec:
        """The part of these settings a bundle keeps."""
        return ModelSpec.model_validate({k: getattr(self, k) for k in ModelSpec.model_fields})
