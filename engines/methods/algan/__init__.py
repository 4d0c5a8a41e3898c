"""ALGAN (Murase and Fukumizu, IEEE Access 2022) on backbone features, with SimpleNet's recipe
(Liu et al., CVPR 2023): the discriminator, trained to separate good features from
pseudo-anomalous ones, is the detector; its per-position logit map is the score map.

On features (the default) it is the stronger variant, though still short of PaDiM on MTD
(image AUROC 0.91 against 0.97 with its defaults, docs/engines.md); on pixels it is the original image-space
ALGAN, kept for small aligned images (it needs no backbone) but near chance on textured parts
such as MTD's tiles.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from engines.methods import STANDARDISE, WEIGHT_AVERAGE, Standardise, TrainedSettings, plugin


class AlganSettings(TrainedSettings):
    # Chosen on the stopping criterion (MTD's train/good plus synthetic defects, lower is better):
    # stage3-6 0.481 against stage3-5 0.537 with the pasted defects alone, 0.505 against 0.519 with
    # cracks and spots added (docs/engines.md).
    default_taps: ClassVar[tuple[str, ...]] = ("stage3", "stage4", "stage5", "stage6")
    kind: Literal["algan"] = "algan"
    epochs: int = Field(40, ge=1, description="upper bound; training stops earlier on the validation criterion")
    batch_size: int = Field(8, ge=1, description="images per optimisation step (on features each gives every "
                                                 "position of its feature map)")
    lr: float = Field(0.0002, gt=0.0, description="Adam learning rate of the discriminator and generator "
                                                  "(the feature adaptor takes half, as SimpleNet)")
    latent_dim: int = Field(64, ge=1, description="generator latent size (per position on features)")
    patience: int = Field(8, ge=1, description="epochs without validation improvement before stopping")
    on_features: bool = Field(True, description="discriminate backbone features (SimpleNet/ALGAN-feature) "
                                                "instead of pixels")
    noise_std: float = Field(1.0, gt=0.0, description="features: std of SimpleNet's Gaussian perturbation of good "
                                                       "features, in units of each channel's spread on good parts")
    margin: float = Field(0.5, gt=0.0, description="features: SimpleNet's truncation: logits beyond +-margin on the "
                                                   "right side cost nothing")
    hidden: int = Field(1024, ge=8, description="features: width of the per-position discriminator (SimpleNet: 1024)")
    position_share: float = Field(0.1, gt=0.0, le=1.0, description="features: share of a batch's feature positions "
                                                                    "(random, new each step) a step trains on")
    # The criterion (held-out good images plus synthetic defects) on MTD, two splits: 0.506 -> 0.499
    # and 0.572 -> 0.559; on KSDD's tiles 0.619 -> 0.627, so each calibration decides (auto).
    spread_scale: bool | Literal["auto"] = Field(
        "auto", description="divide the map at each position by its spread over the good training "
                            "images, so where good parts vary (a border, a rim) a defect must stand out further; "
                            "auto: where it lowers the stopping criterion on the held-out images and synthetic "
                            "defects (without them: off)")
    # Per channel: per position the criterion on synthetic defects of MTD's train/good was 0.617
    # against 0.537 (lower is better).
    standardise: Standardise = Field("channel", description=STANDARDISE)
    # The criterion jumps by ~0.03 between epochs, so the best raw epoch is partly luck. Averaged
    # (decay 0.99, ~2 epochs on MTD) it runs smooth, and over its last epochs it is lower than the
    # raw weights' on two splits of MTD's train/good (0.511 vs 0.516, 0.576 vs 0.58).
    weight_average: float = Field(0.99, ge=0.0, lt=1.0, description=WEIGHT_AVERAGE)
    generator: bool = Field(False, description="features: ALGAN's generator adds fake-normal (z ~ N(0, I)) and "
                                               "pseudo-anomalous (wide z) features to the Gaussian perturbations "
                                               "(off: it lowered detection of synthetic defects on MTD's train/good)")
    anomaly_spread: float = Field(4.0, gt=1.0, description="std of the pseudo-anomalous latents (good ones: 1)")
    snapshot_share: float = Field(0.25, gt=0.0, le=1.0, description="pixels: share of the first epoch after which "
                                                                    "the early generator is frozen")


PLUGINS = [plugin("algan", AlganSettings, "engines.methods.algan.method",
                  "the discriminator against pseudo-anomalies is the detector; backbone features or pixels")]
