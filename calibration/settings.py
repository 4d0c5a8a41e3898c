"""Calibration settings: the ``model:`` section of the configuration (how a bundle is fitted)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from calibration.thresholds import ThresholdConfig
from engines.masks import MaskConfig
from engines.settings import ConfigPath, Settings
from engines.tiling import TilingConfig

__all__ = ["ModelConfig"]


class PadimConfig(Settings):
    dims: int = Field(150, ge=1, description="random channel subset kept from the concatenated taps")
    reg: float = Field(0.01, gt=0.0, description="added to the covariance diagonal (keeps the inverse stable)")


class KnnConfig(Settings):
    # 1 %: the greedy coreset of MTD's 445k patches took 27 min on a loaded 2-core CPU at this
    # ratio; 10 % (the paper's other setting) is for a GPU.
    coreset_ratio: float = Field(0.01, gt=0.0, le=1.0, description="PatchCore: share of patch features kept by "
                                                                   "the greedy coreset (0.1 with a GPU)")
    neighbours: int = Field(1, ge=1, description="patch-level k")
    image_neighbours: int = Field(5, ge=1, description="SPADE: image-level k on pooled features")
    projection_dim: int = Field(128, ge=1, description="random projection used while selecting the coreset")
    image_score: Literal["reweighted", "map_max"] = Field(
        "reweighted", description="PatchCore image score: reweighted (paper) | map_max (maximum of the blurred map)")


class TrainConfig(Settings):
    epochs: int = Field(10, ge=1, description="upper bound; training stops earlier on the validation criterion")
    batch_size: int = Field(16, ge=1, description="images per optimisation step")
    lr: float = Field(0.001, gt=0.0, description="Adam learning rate")
    latent_dim: int = Field(128, ge=1, description="bottleneck / latent vector size")
    patience: int = Field(5, ge=1, description="epochs without validation improvement before stopping")
    on_features: bool = Field(False, description="train on backbone features instead of pixels")


class ModelConfig(Settings):
    method: Literal["padim", "spade", "patchcore", "ae-l2", "ae-ssim", "gan", "algan"] = Field(
        "padim", description="padim | spade | patchcore | ae-l2 | ae-ssim | gan | algan")
    backbone: Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"] = Field(
        "efficientnet_lite0", description="efficientnet_lite0 (ImageNet weights bundled) | resnet18 | "
                                          "wide_resnet50_2")
    weights: ConfigPath | None = Field(None, description="torchvision-format .pth state dict; required for the "
                                                         "ResNets")
    # Stride-8..16 taps: on MTD, [stage3, stage4, stage5] beat [stage2, stage3, stage4] (image AUROC
    # 0.972 vs 0.949, pixel AUPR 0.282 vs 0.258); the last stages add little and cost memory.
    taps: list[str] = Field(default_factory=lambda: ["stage3", "stage4", "stage5"], min_length=1,
                            description="feature layers: Lite0 stage1..7 / block0..15; ResNet stem, layer1..4")
    input_size: list[int] = Field(default_factory=lambda: [256, 256],
                                  description="model input [height, width]; multiples of 32")
    blur_sigma: float = Field(4.0, ge=0.0, description="Gaussian blur of the score map, in input pixels; 0 = off")
    batch_size: int = Field(8, ge=1, description="images (or tiles) per forward pass while fitting")
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="share of train/good held out of the fit to set the "
                                                            "threshold")
    seed: int = Field(0, description="fixes the channel subset, the hold-out split and any training")
    padim: PadimConfig = Field(default_factory=PadimConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    synthetic_defects: int = Field(0, ge=0, description="defective images made from held-out good ones: "
                                                        "miss-rate estimate, and f1 thresholds without real defects")

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or any(s <= 0 or s % 32 or s > 4096 for s in v):
            raise ValueError(f"expected [height, width], positive multiples of 32 up to 4096, got {v}")
        return v


