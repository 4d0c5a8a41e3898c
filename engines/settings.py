"""Typed settings: the base of every configuration section and of the bundle manifest's sections.

Pydantic models, strict: a boolean is not an integer (``qos: true`` is refused), a string is
not a number, an unknown key is an error. Paths are the exception: YAML gives strings, so a
path field takes a string and resolves it against the configuration file's folder (passed as
validation context ``{"base": folder}``).

Validators raise ``SettingError(key, message)`` so the loader can name the exact key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

__all__ = ["ConfigPath", "SettingError", "Settings"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class SettingError(ValueError):
    """A rule on one setting; ``key`` is relative to the section that raised it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _resolve(path: Path, info: ValidationInfo) -> Path:
    path = path.expanduser()
    base = (info.context or {}).get("base") if isinstance(info.context, dict) else None
    return path if path.is_absolute() or base is None else Path(base) / path


ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve)]


def dump(settings: BaseModel) -> dict[str, Any]:
    """Plain data (paths as strings), for printing and for manifests."""
    return settings.model_dump(mode="json")
