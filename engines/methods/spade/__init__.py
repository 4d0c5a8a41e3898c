"""SPADE (Cohen and Hoshen 2020): kNN of pooled features to good images, then of patches to theirs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engines.methods import MethodSettings, plugin


class SpadeSettings(MethodSettings):
    kind: Literal["spade"] = "spade"
    neighbours: int = Field(1, ge=1, description="patch-level k")
    image_neighbours: int = Field(5, ge=1, description="image-level k on pooled features")

    @property
    def own_image_score(self) -> bool:
        return True


PLUGINS = [plugin("spade", SpadeSettings, "engines.methods.spade.method",
                  "image-level kNN on pooled features, then patch kNN within those images' patches")]
