"""Registry mapping CLI names to methods and backends, with their options dataclasses.

Modules register themselves on import; ``_load_all`` imports the known modules lazily so
that ``rtdmd-bench --help`` stays fast and an optional dependency missing for one backend
does not break the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from rtdmd.errors import UserError


@dataclass
class MethodEntry:
    name: str
    factory: Callable  # (cfg: RunConfig, backend: Backend) -> Method
    options: type
    backends: tuple[str, ...]
    default_backend: str
    help: str = ""


@dataclass
class BackendEntry:
    name: str
    factory: Callable  # (options, device) -> Backend
    options: type
    help: str = ""
    extras: tuple[str, ...] = field(default_factory=tuple)


_METHODS: dict[str, MethodEntry] = {}
_BACKENDS: dict[str, BackendEntry] = {}

# Modules that register methods and backends. Kept as strings so imports stay lazy.
_METHOD_MODULES = [
    "rtdmd.methods.teacher",
    "rtdmd.methods.reward_model",
    "rtdmd.methods.ac_dmd",
    "rtdmd.methods.rtdmd",
    "baselines.dmd2",
    "baselines.lcm",
    "baselines.hypersd",
    "baselines.flow_grpo",
]
_BACKEND_MODULES = [
    "rtdmd.backends.shapes",
    "rtdmd.backends.toy2d",
    "rtdmd.backends.sd3",
    "rtdmd.backends.flux2",
]
_loaded = False


def register_method(name: str, options: type, backends, default_backend: str = "shapes", help: str = ""):
    def deco(factory):
        _METHODS[name] = MethodEntry(name, factory, options, tuple(backends), default_backend, help)
        return factory

    return deco


def register_backend(name: str, options: type, help: str = "", extras=()):
    def deco(factory):
        _BACKENDS[name] = BackendEntry(name, factory, options, help, tuple(extras))
        return factory

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _METHOD_MODULES + _BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # A module not written yet, or an optional dependency missing: skip it, but
            # never hide an import error inside our own package.
            if exc.name and exc.name.split(".")[0] in {"rtdmd", "baselines", "benchmarks"} and exc.name != mod:
                raise


def method_names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def backend_names() -> list[str]:
    _load_all()
    return sorted(_BACKENDS)


def get_method(name: str) -> MethodEntry:
    _load_all()
    if name not in _METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def get_backend(name: str) -> BackendEntry:
    _load_all()
    if name not in _BACKENDS:
        raise UserError(f"unknown backend '{name}'; choose one of: {', '.join(sorted(_BACKENDS))}.")
    return _BACKENDS[name]
