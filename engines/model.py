"""What a calibrated model is: the settings that decide its network, head and frame path.

The same ``ModelSpec`` validates the ``model:`` section of config.yaml (calibration adds its
own keys on top, calibration/settings.py) and the ``model`` section of a bundle's manifest, so
every default lives here, once.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from engines.masks import MaskConfig
from engines.methods import METHODS, MethodSettings
from engines.settings import Settings
from engines.tiling import TilingConfig

__all__ = ["ModelSpec"]


TAPS = ("feature layers: Lite0 stage1..7 / block0..15; ResNet stem, layer1..4; not given: the method's default "
        "(stage3-5; ALGAN stage3-6)")


class ModelSpec(Settings):
    method: METHODS.field("padim") = Field(  # type: ignore[valid-type]
        default_factory=METHODS.default_settings("padim"),
        description="the method: a name, or kind: and that method's own keys")
    backbone: Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"] = Field(
        "efficientnet_lite0", description="efficientnet_lite0 (ImageNet weights bundled) | resnet18 | "
                                          "wide_resnet50_2")
    taps: list[str] = Field(default_factory=lambda: list(MethodSettings.default_taps), min_length=1,
                            json_schema_extra={"follows": "method"}, description=TAPS)
    input_size: list[int] = Field(default_factory=lambda: [256, 256],
                                  description="model input [height, width]; multiples of 32 (calibrate warns where "
                                              "frames of another aspect would be squeezed more than 1.5:1)")
    blur_sigma: float = Field(4.0, ge=0.0, description="Gaussian blur of the score map, in input pixels; 0 = off")
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="high-resolution frames: tiles instead "
                                                                           "of one resized image")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="object mask: restrict scoring to the part")

    @model_validator(mode="after")
    def _method_taps(self) -> "ModelSpec":
        # Where taps are not given the method's own default applies, also after the method is
        # changed (calibrate --method). Written past validate_assignment so the key stays unset:
        # only a user's taps are marked given.
        if "taps" not in self.model_fields_set:
            self.__dict__["taps"] = list(self.method.default_taps)
        return self

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or any(s <= 0 or s % 32 or s > 4096 for s in v):
            raise ValueError(f"expected [height, width], positive multiples of 32 up to 4096, got {v}")
        return v

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input_size[0]), int(self.input_size[1])

    @property
    def coarse_weight(self) -> float:
        """Weight of the coarse whole-frame pass in a tiled frame's map (0: tiles only). A method
        that wants one declares a ``coarse_weight`` setting (gan); per-tile-position statistics
        have no place for it."""
        if not self.tiling.enabled or self.per_position:
            return 0.0
        return float(getattr(self.method, "coarse_weight", 0.0))

    @property
    def per_position(self) -> bool:
        return self.tiling.enabled and self.tiling.stats == "per_position"
