"""The configuration's documentation, generated from the settings models (the one source):

- ``config.yaml``: every default, each key with its description as a comment;
- ``docs/configuration.md``: every section and every plugin kind's keys (methods, backends,
  sources), with defaults and descriptions.

    python -m agent.reference --write     # regenerate both after changing a settings model

A test checks that the committed files are what the models generate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agent.config import Config
from agent.sources import SOURCES
from engines.methods import METHODS
from engines.plugins import PluginSettings, Registry
from engines.runtimes import BACKENDS

REPO = Path(__file__).resolve().parents[1]
CONFIG_YAML = REPO / "config.yaml"
REFERENCE_MD = REPO / "docs" / "configuration.md"
COMMENT_COLUMN = 29

HEADER = """\
# Default configuration of the inspection agent, generated from the settings models
# (python -m agent.reference --write); docs/configuration.md lists every method's, backend's and
# source's own keys. Every key is optional; a missing key takes the value shown here (a key shown
# commented out follows another: model.taps is the method's own unless given). Relative
# paths are resolved against this file's folder. Check a file, against this machine too, with:
#   inspection-agent check-config --config FILE
"""


def config_yaml() -> str:
    lines = [HEADER.rstrip("\n"), ""]
    _yaml_section(Config(), Config, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_section(value: BaseModel, model: type[BaseModel], depth: int, lines: list[str]) -> None:
    for name, info in type(value).model_fields.items():
        item = getattr(value, name)
        pad = "  " * depth
        description = _kinds(value) if name == "kind" and isinstance(value, PluginSettings) else info.description
        if isinstance(item, BaseModel):
            lines.append(_commented(f"{pad}{name}:", description))
            _yaml_section(item, type(item), depth + 1, lines)
        elif (info.json_schema_extra or {}).get("follows"):
            # A default that follows another key (taps follow the method): written out, a copy of
            # this file edited to another method would pin this method's value.
            lines.append(_commented(f"{pad}# {name}: {_scalar(item)}", description))
        else:
            lines.append(_commented(f"{pad}{name}: {_scalar(item)}", description))


def _kinds(settings: PluginSettings) -> str:
    """The ``kind`` line's comment: the kinds to choose from."""
    registry = next(r for r in registries()
                    if settings.kind in r.kinds() and type(settings) is r.get(settings.kind).settings)
    return " | ".join(registry.kinds()) + f"; each {registry.family}'s keys: docs/configuration.md"


def _commented(text: str, description: str | None) -> str:
    if not description:
        raise ValueError(f"setting {text.strip()!r} has no description")
    return f"{text.ljust(COMMENT_COLUMN - 1)} # {description}"


def _scalar(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def reference_md() -> str:
    out = ["# Configuration reference", "",
           "Generated from the settings models (`python -m agent.reference --write`); `config.yaml` holds the "
           "defaults. A plugin section (`model.method`, `runtime.backend`, `source`) takes a `kind` and that kind's "
           "keys below; a plain name (`method: patchcore`) is that kind with its defaults.", ""]
    for name, info in Config.model_fields.items():
        out += [f"## `{name}`", "", info.description or "", ""]
        out += _table(getattr(Config(), name), name)
    for title, registry, where in (("Methods (`model.method`)", METHODS, "model.method"),
                                   ("Runtime backends (`runtime.backend`)", BACKENDS, "runtime.backend"),
                                   ("Frame sources (`source`)", SOURCES, "source")):
        out += [f"## {title}", ""]
        for plugin in registry.plugins():
            out += [f"### `{where}: {plugin.kind}`", "", plugin.summary, ""]
            out += _table(plugin.settings(), where)
    return "\n".join(out).rstrip() + "\n"


def _table(value: BaseModel, prefix: str) -> list[str]:
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    for key, default, description in _rows(value, prefix):
        rows.append(f"| `{key}` | `{default}` | {description} |")
    return rows + [""]


def _rows(value: BaseModel, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, info in type(value).model_fields.items():
        item = getattr(value, name)
        key = f"{prefix}.{name}"
        if isinstance(item, PluginSettings):
            rows.append((key, item.kind, (info.description or "").replace("|", "\\|")))
        elif isinstance(item, BaseModel):
            rows += _rows(item, key)
        else:
            rows.append((key, json.dumps(item if not isinstance(item, Path) else str(item)),
                         (info.description or "").replace("|", "\\|")))
    return rows


def registries() -> list[Registry]:
    return [METHODS, BACKENDS, SOURCES]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.reference", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write config.yaml and docs/configuration.md")
    args = p.parse_args(argv)
    if args.write:
        CONFIG_YAML.write_text(config_yaml())
        REFERENCE_MD.parent.mkdir(exist_ok=True)
        REFERENCE_MD.write_text(reference_md())
        print(f"wrote {CONFIG_YAML} and {REFERENCE_MD}")
    else:
        sys.stdout.write(config_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
