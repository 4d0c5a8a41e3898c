"""ALGAN (Murase and Fukumizu 2022): the discriminator, trained to separate good images from the
generator's pseudo-anomalies, is the detector; its per-patch logit map is the score map."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import TrainedSettings, plugin


class AlganSettings(TrainedSettings):
    kind: Literal["algan"] = "algan"
    lr: float = Field(0.0002, gt=0.0, description="Adam learning rate (GAN momentum 0.5)")
    on_features: bool = Field(False, description="discriminate backbone features instead of pixels")
    anomaly_spread: float = Field(4.0, gt=1.0, description="std of the pseudo-anomalous latents (good ones: 1)")
    snapshot_share: float = Field(0.25, gt=0.0, le=1.0, description="share of the first epoch after which the "
                                                                    "early generator is frozen")


PLUGINS = [plugin("algan", AlganSettings, "engines.methods.algan.method",
                  "the discriminator against pseudo-anomalies is the detector; pixels or backbone features")]
