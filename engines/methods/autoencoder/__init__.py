"""Convolutional autoencoders (``ae-l2``, ``ae-ssim``): anomaly = what the reconstruction misses.

On pixels (an encoder-decoder with a dense bottleneck) or on backbone features (a per-position
channel bottleneck, as in DFR). ``ae-l2`` scores the squared residual, ``ae-ssim`` 1 - SSIM
(Bergmann et al.): SSIM finds structural defects, such as a fine crack in a texture, that a
blurry L2 residual misses.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import TrainedSettings, plugin


class AutoencoderSettings(TrainedSettings):
    on_features: bool = Field(False, description="reconstruct backbone features instead of pixels")


class AeL2Settings(AutoencoderSettings):
    kind: Literal["ae-l2"] = "ae-l2"


class AeSsimSettings(AutoencoderSettings):
    kind: Literal["ae-ssim"] = "ae-ssim"


PLUGINS = [
    plugin("ae-l2", AeL2Settings, "engines.methods.autoencoder.method",
           "autoencoder, residual = squared error; on pixels or backbone features"),
    plugin("ae-ssim", AeSsimSettings, "engines.methods.autoencoder.method",
           "autoencoder, residual = 1 - SSIM; on pixels or backbone features"),
]
