"""When the Monarch plug-in is registered with transformers: as late as possible, never too late.

``import monarchify`` must stay cheap (no torch, no transformers: the command line and the
torch-only core import it), yet a user who then calls stock ``AutoModel.from_pretrained`` on
a Monarch folder needs the plug-in registered. Every ``from_pretrained`` goes through
``transformers.quantizers.auto`` (the mapping the plug-in is added to), so registration is
tied to that module: done at once if it is already imported, otherwise right after it is
first imported, by a one-shot import hook that removes itself.

Torch- and transformers-free: only :func:`_register` imports the plug-in.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

TRIGGER = "transformers.quantizers.auto"


def _register() -> None:
    plugin = sys.modules.get("monarchify.hf.plugin")
    if plugin is not None and not hasattr(plugin, "register"):
        return  # the plug-in module itself is being imported: it registers when it is done
    from monarchify.hf.plugin import register

    register()


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers the plug-in into the freshly loaded mapping."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds the trigger module through the other finders and wraps its loader, once."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TRIGGER:
            return None
        uninstall()
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterOnImport)]


def register_when_needed() -> None:
    """Register now if transformers' quantizer mapping is loaded, else as soon as it loads."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
