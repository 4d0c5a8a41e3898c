"""PaDiM (Defard et al. 2021): per-position Gaussians over backbone features, Mahalanobis distance."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import MethodSettings, plugin


class PadimSettings(MethodSettings):
    kind: Literal["padim"] = "padim"
    dims: int = Field(150, ge=1, description="random channel subset kept from the concatenated taps")
    reg: float = Field(0.01, gt=0.0, description="added to the covariance diagonal (keeps the inverse stable)")


PLUGINS = [plugin("padim", PadimSettings, "engines.methods.padim.method",
                  "per-position Gaussians over backbone features; streaming fit, per-tile-position statistics")]
