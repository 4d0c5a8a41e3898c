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

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

__all__ = ["ConfigPath", "SettingError", "Settings", "describe", "dump", "line_of"]


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


# --- one line per mistake -------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list",
    "model_type": "expected a mapping", "dict_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "path_type": "expected a path",
}

_BOUNDS = {
    "greater_than": "more than {gt}", "greater_than_equal": "at least {ge}",
    "less_than": "less than {lt}", "less_than_equal": "at most {le}",
    "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)",
    "string_too_short": "at least {min_length} character(s)", "string_pattern_mismatch": "a value matching {pattern}",
}


def describe(error: ValidationError, file: Path | str, lines: dict[tuple, int] | None = None,
             root: type[BaseModel] | None = None) -> str:
    """One line for the first error: ``file:line: key: what was expected, got what``. ``lines``
    maps key paths to lines of the file; ``root`` is the model validated (to list known keys)."""
    err = error.errors(include_url=False)[0]
    # A union (``taps: [..] | auto``) tags the location with the member tried ("list[str]"): not a key.
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    key = _key(loc)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingError):
        key = f"{key}.{cause.key}" if key else cause.key
        loc = loc + tuple(cause.key.split("."))
        what = cause.message
    elif err["type"] == "extra_forbidden":
        fields = _fields_at(root, loc[:-1]) if root is not None else []
        return (f"{file}{line_of(lines, loc)}: unknown key '{key}'"
                + (f" (expected one of: {', '.join(fields)})" if fields else ""))
    elif err["type"] == "missing":
        what = "missing (a required key)"
    elif err["type"] == "literal_error":
        what = f"expected one of {err['ctx']['expected']}, got {err['input']!r}"
    elif err["type"] in _EXPECTED:
        what = f"{_EXPECTED[err['type']]}, got {_shown(err['input'])}"
    elif err["type"] in _BOUNDS:
        what = f"expected {_BOUNDS[err['type']].format(**err['ctx'])}, got {_shown(err['input'])}"
    else:
        what = f"{err['msg'][0].lower()}{err['msg'][1:]}".removeprefix("value error, ")
        what += f", got {_shown(err['input'])}" if "got" not in what and not isinstance(err["input"], dict) else ""
    return f"{file}{line_of(lines, loc)}: {key or 'top level'}: {what}"


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = root
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        model = info.annotation
    return list(getattr(model, "model_fields", {}))


def line_of(lines: dict[tuple, int] | None, loc: tuple) -> str:
    """``:line`` of the key at ``loc`` (or of its nearest ancestor) in a file, or ""."""
    while lines and loc:
        if loc in lines:
            return f":{lines[loc]}"
        loc = loc[:-1]
    return ""


