"""The reconstruction GAN (``gan``): a generator trained on good images repairs what it is shown;
anomaly = what it cannot give back, measured as the structural (1 - SSIM) and perceptual (frozen
backbone features) difference between the input and its reconstruction.

High resolution: the network is fully convolutional and scores model-size tiles
(``model.tiling``), so a defect a few pixels wide in a large frame keeps its pixels. Training
uses random crops of the model inputs (with flips and quarter turns), so a 2-core CPU fits in
minutes.

Not copying defects: the generator is a U-Net without its full-resolution skip, trained as a
*repairer* (as DRAEM's reconstructive network, Zavrtanik et al. 2021): most training crops get a
synthetic defect (blobs, scratches, patches of other crops, brightness or contrast changes) and
the target is the clean crop. It learns to keep good surface and replace what does not belong.
Losses: L1 + SSIM + feature matching on the frozen backbone's early features, and a PatchGAN
discriminator's adversarial term (sharper reconstructions, so good texture leaves a smaller
residual).

The whole image, not only patches: a **coarse whole-frame pass**. With tiling on, each frame is
also resized whole to the model input and scored by the same graph; its map, upsampled to the
frame, is blended into the stitched tile map (``coarse_weight``). Chosen over a global-context
input because it needs no second network input (every runtime, export and the per-tile batching
stay as they are), the same generator serves both scales (it is trained on tiles and on whole
frames), and it sees what no tile can: a defect larger than a tile or one that is only wrong
in its place on the part. A global-context input would also have to be trained to be used,
while the coarse pass is useful from the first epoch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import Side16, TrainedSettings, plugin


class GanSettings(TrainedSettings):
    kind: Literal["gan"] = "gan"
    epochs: int = Field(200, ge=1, description="upper bound; training stops earlier on the validation criterion "
                                               "or the time budget (max_minutes)")
    lr: float = Field(0.0005, gt=0.0, description="Adam learning rate (GAN momentum 0.5)")
    latent_dim: int = Field(128, ge=1, description="channels of the generator's stride-16 bottleneck")
    patience: int = Field(10, ge=1, description="epochs without validation improvement before stopping")
    width: int = Field(16, ge=4, le=128, description="channels of the generator's first level (doubled per level)")
    crop: Side16 = Field(96, ge=32, le=1024, description="side of the random training crops taken from the model "
                                                           "inputs (px, multiple of 16; at most the input size)")
    epoch_inputs: int = Field(1024, ge=8, description="training crops per epoch at most (one per model input "
                                                          "otherwise); validation runs once per epoch")
    corruption: float = Field(0.75, ge=0.0, le=1.0, description="share of training crops given a synthetic defect "
                                                                 "that the generator learns to remove")
    reconstruction_weight: float = Field(1.0, ge=0.0, description="L1 + (1 - SSIM) to the clean crop")
    feature_weight: float = Field(1.0, ge=0.0, description="feature matching on the frozen backbone's "
                                                           "stage2 features")
    adversarial_weight: float = Field(0.05, ge=0.0, description="fooling the PatchGAN discriminator")
    # repair by default: on MTD's held-out good images the detection criterion is lowest for a barely
    # trained generator (epoch 2) and rises as the repair error falls, and on KSDD's tiles it spends
    # ~20 s of each epoch's budget. Both measured in docs/engines.md (sixth session).
    stop_on: Literal["repair", "detection"] = Field(
        "repair", description="what keeps the epoch: repair = the repair error of held-out good inputs given fixed "
                              "synthetic defects; detection = how well the map finds calibration's synthetic defects "
                              "among held-out good inputs (model.validation_defects), as the other trained methods")
    coarse_weight: float = Field(0.3, ge=0.0, le=1.0, description="tiled frames: weight of the coarse whole-frame "
                                                                   "pass in the map ((1 - w) tiles + w whole frame); "
                                                                   "0 = tiles only")


PLUGINS = [plugin("gan", GanSettings, "engines.methods.gan.method",
                  "U-Net generator trained to repair synthetic defects + PatchGAN; residual = 1 - SSIM plus "
                  "backbone-feature distance, on tiles with a coarse whole-frame pass")]
