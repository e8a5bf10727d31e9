"""Build the plugin manager: built-in plugins first, then third-party ones from entry points.

A factory rather than a module-level singleton, so each test (and each gateway) gets a fresh
manager. ``CAPFAAS_DISABLE_PLUGIN_AUTOLOAD=1`` skips the ``capfaas`` entry-point group.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass

import pluggy

from . import __version__, hookspecs

DEFAULT_PLUGINS = (
    "capfaas.backends.emulated.plugin",
    "capfaas.backends.morello.plugin",
    "capfaas.plugins.libos",
    "capfaas.plugins.pooling",
    "capfaas.plugins.channels.calls",
    "capfaas.plugins.channels.files",
    "capfaas.plugins.channels.streams",
)
ENTRY_POINT_GROUP = "capfaas"


def autoload_disabled() -> bool:
    return os.environ.get("CAPFAAS_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")


def make_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A manager with every hook spec, the built-ins, and (unless disabled) installed plugins."""
    pm = pluggy.PluginManager("capfaas")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if autoload if autoload is not None else not autoload_disabled():
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


def plugin_infos(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with the distribution that ships it and the hooks it implements."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        if dist is not None:
            infos.append(PluginInfo(name, dist.project_name, dist.version, hooks))
        else:
            infos.append(PluginInfo(name, "capfaas", __version__, hooks))
    return infos
