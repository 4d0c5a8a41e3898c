"""Methods as plugins: one folder per method, holding its settings, network, head and fit.

A method folder (``engines/methods/<name>/``) has two files:

- ``__init__.py``: its typed settings (a ``MethodSettings`` whose ``kind`` names the method) and
  ``PLUGINS``, the record ``METHODS`` finds. It imports no torch: the configuration reads it.
- ``method.py``: the implementation, imported when the method is used, with three functions

  - ``network(spec, pretrained, weights) -> nn.Module``: the engine network on normalised RGB
    input (``engines.graph.EngineGraph`` puts the uint8 input handling in front of it); its
    outputs are what the head reads;
  - ``head(spec, tensors) -> nn.Module``: engine outputs -> score map (B, h, w), or
    ``(map, image_score (B,))`` for a method with its own image score; ``tensors`` are the
    bundle's head statistics (head.safetensors);
  - ``fit(spec, context) -> Fitted``: fitting on good images (``FitContext``).

Adding a method is one new folder plus its tests; nothing else changes (see
tests/test_plugins.py, which adds one from a test file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterator, Literal, Protocol

from pydantic import AfterValidator, Field

from engines.plugins import Plugin, PluginSettings, Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engines.model import ModelSpec

__all__ = ["METHODS", "FitContext", "FitData", "Fitted", "MethodSettings", "TrainedSettings", "ValidationSet"]

METHODS = Registry("engines.methods", "method")


class MethodSettings(PluginSettings):
    """Base of every method's settings."""

    # The backbone stages read where model.taps is not given. Stride-8..16 taps: for PaDiM on MTD,
    # [stage3, stage4, stage5] beat [stage2, stage3, stage4] (image AUROC 0.972 vs 0.949, pixel
    # AUPR 0.282 vs 0.258); the last stages add little and cost memory.
    default_taps: ClassVar[tuple[str, ...]] = ("stage3", "stage4", "stage5")

    @property
    def own_image_score(self) -> bool:
        """Whether the head gives an image score of its own (else the image score is the map's peak)."""
        return False


def _multiple_of_16(v: int) -> int:
    if v % 16:
        raise ValueError(f"expected a multiple of 16, got {v}")
    return v


# A side in pixels that the networks' four stride-2 levels divide evenly.
Side16 = Annotated[int, AfterValidator(_multiple_of_16)]


# How a feature method standardises backbone features before its model: "channel" (one mean and
# spread per channel) or "position" (per channel and grid position: the model then sees how far
# each position is from what that position holds on good parts, PaDiM's diagonal).
Standardise = Literal["channel", "position"]
STANDARDISE = ("features: standardise backbone features per channel, or per channel and grid position (fixed "
               "framing: the model sees each position's deviation)")


WEIGHT_AVERAGE = ("decay of an exponential moving average of the weights over the training steps; each epoch is "
                  "judged, and the best kept, by the average instead of the last step's weights (0: off)")


class TrainedSettings(MethodSettings):
    """What every trained method (autoencoders, GANs) shares: the training run."""

    epochs: int = Field(10, ge=1, description="upper bound; training stops earlier on the validation criterion")
    batch_size: int = Field(16, ge=1, description="images per optimisation step")
    lr: float = Field(0.001, gt=0.0, description="Adam learning rate")
    latent_dim: int = Field(128, ge=1, description="bottleneck / latent vector size")
    patience: int = Field(5, ge=1, description="epochs without validation improvement before stopping")
    max_minutes: float = Field(15.0, gt=0.0, description="time budget of the training run: it stops after the "
                                                          "epoch that passes it and keeps the best epoch so far")
    weight_average: float = Field(0.0, ge=0.0, lt=1.0, description=WEIGHT_AVERAGE)


class FitData(Protocol):
    """Good images as the engine takes them: uint8 (N, H, W, 3) BGR tensors, model-size (resized
    or tiles), in file order."""

    def batches(self, desc: str) -> Iterator["torch.Tensor"]:
        """Batches of images or tiles."""
        ...

    def per_image(self, desc: str) -> Iterator["torch.Tensor"]:
        """One group per file: its tiles in grid order (or the image alone)."""
        ...

    def __len__(self) -> int:
        """Files."""
        ...

    def inputs(self) -> int:
        """Model inputs (images or tiles) the set yields."""
        ...


@dataclass
class ValidationSet:
    """Model inputs with known defects and no real one: held-out good images and synthetic defects
    made from them (calibration builds it; engines must not import the generator's layer). A
    trained method stops on how well it finds these."""

    images: "torch.Tensor"             # uint8 (N, H, W, 3) BGR model inputs (images or tiles)
    masks: "torch.Tensor"              # bool (N, H, W): True where a defect was made; all False: good

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class FitContext:
    train: FitData                     # the images to fit on
    held_out: FitData                  # good images kept out of the fit (validation, early stopping)
    seed: int = 0
    weights: Path | None = None        # the backbone's weights file (ResNets)
    batch_size: int = 8
    progress: bool = True
    validation: ValidationSet | None = None  # synthetic defects on held-out images: the stopping criterion


@dataclass
class Fitted:
    network_state: dict[str, "torch.Tensor"]  # the engine graph's weights (network.safetensors)
    head_tensors: dict[str, "torch.Tensor"]   # the head's statistics (head.safetensors)
    info: dict[str, Any] = field(default_factory=dict)  # fit time, samples, epochs, ...


class MethodImplementation(Protocol):
    def network(self, spec: "ModelSpec", pretrained: bool = False, weights: str | None = None) -> "nn.Module": ...

    def head(self, spec: "ModelSpec", tensors: dict[str, "torch.Tensor"]) -> "nn.Module": ...

    def fit(self, spec: "ModelSpec", context: FitContext) -> Fitted: ...


def implementation(kind: str) -> MethodImplementation:
    return METHODS.load(kind)


def plugin(kind: str, settings: type[MethodSettings], module: str, summary: str) -> Plugin:
    """The record of a method folder: its implementation is ``module``, imported on first use."""
    import importlib

    return Plugin(kind, settings, lambda: importlib.import_module(module), summary)
