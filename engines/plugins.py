"""Plugins: methods, runtime backends, frame sources, each found by one mechanism.

A plugin family is a package (``engines.methods``, ``engines.runtimes``, ``agent.sources``).
Every module or subpackage in it that defines ``PLUGINS`` (a list of ``Plugin`` records) adds
its plugins; the family's ``Registry`` finds them by scanning the package on first use, so
adding a plugin is adding one file (or folder) and touches nothing else. ``register`` adds one
from elsewhere (a test, an integrator's package).

A plugin brings its own typed settings: a ``Settings`` model whose ``kind`` field (a literal)
names the plugin. ``Registry.field()`` is the pydantic type of a configuration or manifest
section that holds one of them: the ``kind`` selects the settings model (a discriminated union
that stays open to plugins registered later); a plain string is the kind with its defaults.

The implementation behind a plugin (``Plugin.load``) is imported only when it is used: a
settings module must import without torch, because ``check-config`` reads them all.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import SerializeAsAny, ValidationInfo, WrapValidator
from pydantic_core import PydanticCustomError

from engines.settings import Settings

__all__ = ["Plugin", "PluginSettings", "Registry"]


class PluginSettings(Settings):
    """Base of every plugin's settings; subclasses narrow ``kind`` to their own literal."""

    kind: str


@dataclass(frozen=True)
class Plugin:
    kind: str
    settings: type[PluginSettings]
    load: Callable[[], Any]   # the implementation (a module or an object), imported when first used
    summary: str = ""         # one line for the reference documentation


class Registry:
    """The plugins of one family, found in ``package`` (and any registered by hand)."""

    def __init__(self, package: str, family: str) -> None:
        self.package = package
        self.family = family
        self._plugins: dict[str, Plugin] = {}
        self._scanned = False
        self._lock = threading.RLock()  # a plugin module may ask for kinds while being scanned

    def register(self, plugin: Plugin) -> None:
        """Add a plugin from outside the package (an integrator's module, a test)."""
        self._scan()
        self._add(plugin)

    def unregister(self, kind: str) -> None:
        self._scan()
        self._plugins.pop(kind, None)

    def get(self, kind: str) -> Plugin:
        self._scan()
        if kind not in self._plugins:
            raise ValueError(f"unknown {self.family} {kind!r}; expected one of {', '.join(self.kinds())}")
        return self._plugins[kind]

    def kinds(self) -> list[str]:
        self._scan()
        return list(self._plugins)

    def plugins(self) -> list[Plugin]:
        self._scan()
        return list(self._plugins.values())

    def load(self, kind: str) -> Any:
        """The implementation of ``kind`` (imports it)."""
        return self.get(kind).load()

    def field(self, default: str) -> Any:
        """The pydantic type of a section holding one plugin's settings, chosen by ``kind`` (``default``
        where the section names none) and returned with its defaults by ``default_settings``."""
        def validate(value: Any, handler: Any, info: ValidationInfo) -> PluginSettings:
            return self._validate(value, default, info)

        return Annotated[SerializeAsAny[PluginSettings], WrapValidator(validate)]

    def default_settings(self, kind: str) -> Callable[[], PluginSettings]:
        return lambda: self.get(kind).settings()

    def _validate(self, value: Any, default: str, info: ValidationInfo) -> PluginSettings:
        if isinstance(value, PluginSettings) and value.kind in self.kinds():
            return value
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, dict):
            raise PydanticCustomError("model_type", "expected a mapping (or the name of a {family})",
                                      {"family": self.family})
        value = {"kind": default, **value}
        kind = value.get("kind")
        if kind not in self.kinds():
            raise PydanticCustomError("plugin_kind", f"expected kind one of {', '.join(map(repr, self.kinds()))}, "
                                                     f"got {kind!r}")
        return self._plugins[kind].settings.model_validate(value, context=info.context)

    def _scan(self) -> None:
        if self._scanned:
            return
        with self._lock:
            if self._scanned:
                return
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                if info.name.startswith("_"):
                    continue
                module = importlib.import_module(f"{self.package}.{info.name}")
                for plugin in getattr(module, "PLUGINS", ()):
                    self._add(plugin)
            self._scanned = True

    def _add(self, plugin: Plugin) -> None:
        declared = plugin.settings.model_fields["kind"].default
        if declared != plugin.kind:
            raise ValueError(f"{self.family} plugin {plugin.kind!r}: its settings' kind defaults to {declared!r}")
        self._plugins[plugin.kind] = plugin
