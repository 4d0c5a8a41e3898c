"""Convolutional autoencoders (``ae-l2``, ``ae-ssim``): anomaly = what the reconstruction misses.

On pixels, Bergmann et al.'s architecture (VISAPP 2019, the MVTec AD paper's AE baselines): a
convolutional encoder to a dense latent and its mirror, at a moderate working side (128 px);
``ae-l2`` scores the squared residual per pixel, ``ae-ssim`` 1 - SSIM (11 px Gaussian window),
which finds structural defects, such as a fine crack in a texture, that a blurry L2 residual
misses. Meant for aligned objects and regular textures at moderate resolution.

On backbone features: a channel bottleneck over the standardised, 3x3-aggregated features, the
residual computed on the feature grid. By default each grid position has its own linear encoder
and decoder (``coder: per-position``), fitted in closed form: the top principal directions of
that position's good features are the optimum of the L2 reconstruction loss (Baldi and Hornik
1989), so the model learns what each place of a fixed framing holds. ``coder: shared`` is one
trained non-linear 1x1 coder for all positions (DFR, Shi et al. 2021), for parts whose pose
varies. See docs/engines.md for where each variant fits.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engines.methods import Side16, STANDARDISE, Standardise, TrainedSettings, plugin
from engines.settings import SettingError

# What only training reads: refused where nothing is trained, so that no set key does nothing.
TRAINING = ("epochs", "patience", "lr", "batch_size", "max_minutes", "weight_average")


class AutoencoderSettings(TrainedSettings):
    epochs: int = Field(60, ge=1, description="upper bound; training stops earlier on the validation criterion")
    patience: int = Field(8, ge=1, description="epochs without validation improvement before stopping")
    latent_dim: int | None = Field(None, ge=1, description="bottleneck size; default: 100 on pixels (Bergmann "
                                                           "et al.), a quarter of the feature channels on features")
    on_features: bool = Field(False, description="reconstruct backbone features instead of pixels")
    standardise: Standardise = Field("channel", description=STANDARDISE)
    # Per position: on MTD's held-out good images plus synthetic defects (never its test set) the
    # criterion (lower is better) is 0.461 against 0.551 for the shared coder (docs/engines.md).
    coder: Literal["per-position", "shared"] = Field(
        "per-position", description="features: per-position = each grid position its own linear encoder and "
                                    "decoder, fitted in closed form (PCA: the optimum of the L2 loss), for a fixed "
                                    "framing; shared = one trained non-linear 1x1 coder for every position (DFR)")
    pixel_side: Side16 = Field(128, ge=32, le=1024, description="pixels: the side the autoencoder works at (the input "
                                                                "is resized to it inside the graph); a multiple of 16")
    augment: bool = Field(True, description="pixels: random mirroring and quarter turns of training images (the "
                                            "MVTec AD paper's augmentation); off for parts with a fixed orientation")

    @model_validator(mode="after")
    def _closed_form_takes_no_training(self) -> "AutoencoderSettings":
        if self.on_features and self.coder == "per-position":
            for key in TRAINING:
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise SettingError(key, "the per-position coder is fitted in closed form, not trained; "
                                            "coder: shared trains one")
        return self


class AeL2Settings(AutoencoderSettings):
    kind: Literal["ae-l2"] = "ae-l2"
    # Chosen on synthetic defects of MTD's train/good (never its test set), the criterion (lower is
    # better) per position against per channel: ae-l2 0.566 vs 0.643, ae-ssim 0.669 vs 0.569.
    standardise: Standardise = Field("position", description=STANDARDISE)


class AeSsimSettings(AutoencoderSettings):
    kind: Literal["ae-ssim"] = "ae-ssim"


PLUGINS = [
    plugin("ae-l2", AeL2Settings, "engines.methods.autoencoder.method",
           "autoencoder, residual = squared error; on pixels or backbone features"),
    plugin("ae-ssim", AeSsimSettings, "engines.methods.autoencoder.method",
           "autoencoder, residual = 1 - SSIM; on pixels or backbone features"),
]
