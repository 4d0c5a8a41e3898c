"""PatchCore (Roth et al. 2022): locally aggregated patch features against a coreset memory bank."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import MethodSettings, plugin


class PatchcoreSettings(MethodSettings):
    kind: Literal["patchcore"] = "patchcore"
    # 1 %: the greedy coreset of MTD's 445k patches took 27 min on a loaded 2-core CPU at this
    # ratio; 10 % (the paper's other setting) is for a GPU.
    coreset_ratio: float = Field(0.01, gt=0.0, le=1.0, description="share of patch features kept by the greedy "
                                                                   "coreset (0.1 with a GPU)")
    neighbours: int = Field(1, ge=1, description="k nearest bank patches averaged per test patch")
    support: int = Field(9, ge=1, description="the reweighting's neighbourhood of the nearest bank patch (the "
                                              "paper's b)")
    projection_dim: int = Field(128, ge=1, description="random projection used while selecting the coreset")
    image_score: Literal["reweighted", "map_max"] = Field(
        "reweighted", description="reweighted (the paper's) | map_max (maximum of the blurred map)")

    @property
    def own_image_score(self) -> bool:
        return self.image_score == "reweighted"


PLUGINS = [plugin("patchcore", PatchcoreSettings, "engines.methods.patchcore.method",
                  "3x3-averaged patch features, greedy coreset bank, nearest-neighbour distance, reweighted score")]
