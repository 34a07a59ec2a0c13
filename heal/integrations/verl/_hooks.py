"""Run a callback right after a given module has been imported (a post-import hook).

verl loads heal's plugin while ``import verl`` is still running, before verl's registries
(``verl.trainer.ppo.core_algos``, ``verl.trainer.ppo.v1.trainer_base``, ...) are imported. Importing
them eagerly from the plugin would add several seconds to every process that imports verl
(driver, task runner, every Ray worker) and would import verl's trainer inside verl's own
``__init__``. Instead the plugin asks to be called when those modules are imported, whoever imports
them: the callback runs as soon as the module body has executed, before the importer gets it back,
so a module that looks a name up in a registry right after importing it already sees heal's entries.

The hook is a :class:`importlib.abc.MetaPathFinder` placed first on ``sys.meta_path``. For a watched
module it finds the real spec with the remaining finders, wraps the loader for the one
``exec_module`` call (the module's ``__loader__``/``__spec__.loader`` are the original loader), then
runs the callbacks. If the module is already imported, :func:`when_imported` runs the callback at once.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from typing import Callable, Dict, List

__all__ = ["when_imported", "around_import"]

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_pending: Dict[str, List[Callable]] = {}
_around: Dict[str, List[Callable]] = {}  # module -> context-manager factories wrapped around its exec
_busy: set = set()


def _run(name: str, module, callbacks: List[Callable]) -> None:
    for cb in callbacks:
        try:
            cb(module)
        except Exception:  # a broken hook must not break verl's own import
            logger.warning("heal: post-import hook %r for %s failed", getattr(cb, "__name__", cb), name, exc_info=True)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def __getattr__(self, attr):  # get_code, get_source, is_package, ... (runpy's `python -m` needs them)
        return getattr(self._inner, attr)

    def exec_module(self, module):
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        with _lock:
            arounds = _around.pop(self._name, [])
        with contextlib.ExitStack() as stack:
            for factory in arounds:
                try:
                    stack.enter_context(factory(self._name))
                except Exception:
                    logger.warning("heal: import hook %r for %s failed", getattr(factory, "__name__", factory),
                                   self._name, exc_info=True)
            self._inner.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self._name, [])
        _run(self._name, module, callbacks)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if (fullname not in _pending and fullname not in _around) or fullname in _busy:
            return None
        _busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_FINDER = _Finder()


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once module ``name`` is imported (now, if it already is).

    Exceptions raised by the callback are logged (``logging.WARNING``, with traceback) and
    swallowed, so that a broken hook never breaks the import of verl itself.
    """
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    _run(name, module, [callback])


def around_import(name: str, factory: Callable) -> bool:
    """Run module ``name``'s body inside the context manager ``factory(name)`` the next time it is
    imported (for a module whose body fails unless something is arranged first). Returns False, and
    arranges nothing, when the module is already imported. A factory that raises on entry is logged
    and skipped; the module is imported all the same."""
    with _lock:
        if name in sys.modules:
            return False
        _around.setdefault(name, []).append(factory)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    return True
