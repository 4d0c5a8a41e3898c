"""The reconstruction GAN (``gan``, GANomaly / f-AnoGAN line): an encoder trained with the
generator maps an image to its latent in one pass; anomaly = pixel residual plus the distance of
the discriminator's features of input and reconstruction. Fixed input size: suits tiles."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import TrainedSettings, plugin


class GanSettings(TrainedSettings):
    kind: Literal["gan"] = "gan"
    lr: float = Field(0.0002, gt=0.0, description="Adam learning rate (GAN momentum 0.5)")
    reconstruction_weight: float = Field(50.0, gt=0.0, description="GANomaly's contextual weight: "
                                                                   "reconstruction dominates the generator loss")
    feature_weight: float = Field(1.0, ge=0.0, description="discriminator-feature matching (f-AnoGAN's izi_f)")
    adversarial_weight: float = Field(1.0, ge=0.0, description="fooling the discriminator")


PLUGINS = [plugin("gan", GanSettings, "engines.methods.gan.method",
                  "encoder + generator + discriminator; pixel residual plus discriminator-feature distance")]
