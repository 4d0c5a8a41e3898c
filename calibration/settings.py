"""Calibration settings: the ``model:`` section of the configuration, how a bundle is fitted.

``ModelConfig`` is the model itself (``engines.model.ModelSpec``: method and its settings,
backbone, taps, input, blur, tiling, mask; the same model validates the bundle manifest) plus
what only fitting needs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from calibration.thresholds import ThresholdConfig
from engines.methods import MethodSettings
from engines.model import TAPS, ModelSpec
from engines.settings import ConfigPath, Settings

__all__ = ["ModelConfig", "TapSearchConfig"]


class TapSearchConfig(Settings):
    defects: int = Field(60, ge=3, description="synthetic defects pasted onto the held-out good images to rank "
                                               "the candidate taps")
    max_taps: int = Field(3, ge=1, le=4, description="the most backbone stages in one candidate set")
    min_stride: int = Field(8, ge=2, description="candidate stages at this stride or coarser (a stride-4 stage "
                                                 "costs each set about 4 times the work)")
    fit_images: int = Field(200, ge=4, description="fit-split images each candidate is fitted on (spread over the "
                                                   "split; the chosen taps are then fitted on all of it)")


class ModelConfig(ModelSpec):
    # A bundle holds the taps it was fitted with; a configuration may ask calibration to choose them.
    taps: list[str] | Literal["auto"] = Field(
        default_factory=lambda: list(MethodSettings.default_taps), min_length=1,
        json_schema_extra={"follows": "method"},
        description=TAPS + "; or auto: every set of one to three stages ranked at calibration on held-out good "
                           "images plus synthetic defects, the default kept unless the best clearly leads it on "
                           "pixel AUPR and does not trail it on image AUROC (PaDiM, untiled; the ranking goes into "
                           "the bundle and the evaluate report)")
    tap_search: TapSearchConfig = Field(default_factory=TapSearchConfig, description="taps: auto: the search")
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

    def spec(self, taps: list[str] | None = None) -> ModelSpec:
        """The part of these settings a bundle keeps; ``taps`` where calibration chose them (``auto``)."""
        values = {k: getattr(self, k) for k in ModelSpec.model_fields}
        if taps is not None:
            values["taps"] = taps
        elif self.taps == "auto":
            raise ValueError("model.taps: auto is resolved by calibration; no bundle spec before it")
        return ModelSpec.model_validate(values)
