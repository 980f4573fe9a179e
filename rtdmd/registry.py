"""Registry mapping CLI names to methods and backends, with their options dataclasses.

Modules register themselves on import; only the module of the name asked for is imported, so
that ``rtdmd-bench --help`` stays fast and an optional dependency missing for one backend
does not break the others.
"""

from __future__ import annotations

import importlib
import importlib.util
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

# CLI name -> module that registers it. Only the module of the name asked for is imported,
# so a missing optional dependency of one backend never affects another, and --help is fast.
_METHOD_MODULES = {
    "teacher": "rtdmd.methods.teacher",
    "reward": "rtdmd.methods.reward_model",
    "ac-dmd": "rtdmd.methods.ac_dmd",
    "rtdmd": "rtdmd.methods.rtdmd",
    "dmd2": "baselines.dmd2",
    "lcm": "baselines.lcm",
    "hypersd": "baselines.hypersd",
    "flow-grpo": "baselines.flow_grpo",
}
_BACKEND_MODULES = {
    "shapes": "rtdmd.backends.shapes",
    "toy2d": "rtdmd.backends.toy2d",
    "sd3": "rtdmd.backends.sd3",
    "flux2": "rtdmd.backends.flux2",
}


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


def _import(kind: str, name: str, modules: dict[str, str]) -> None:
    mod = modules.get(name)
    if mod is None:
        raise UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(_available(modules))}.")
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        if exc.name == mod:  # not written yet in this version of the project
            raise UserError(f"{kind} '{name}' is not available in this version; choose one of: "
                            f"{', '.join(_available(modules))}.") from None
        if exc.name and exc.name.split(".")[0] in {"rtdmd", "baselines", "benchmarks"}:
            raise
        raise UserError(f"{kind} '{name}' needs the package '{exc.name}', which is not installed; "
                        "install the extras with pip install 'rtdmd-bench[real,scorers]'.") from None


def _available(modules: dict[str, str]) -> list[str]:
    return sorted(n for n, m in modules.items() if importlib.util.find_spec(m) is not None)


def method_names() -> list[str]:
    return _available(_METHOD_MODULES)


def backend_names() -> list[str]:
    return _available(_BACKEND_MODULES)


def get_method(name: str) -> MethodEntry:
    if name not in _METHODS:
        _import("method", name, _METHOD_MODULES)
    return _METHODS[name]


def get_backend(name: str) -> BackendEntry:
    if name not in _BACKENDS:
        _import("backend", name, _BACKEND_MODULES)
    return _BACKENDS[name]
