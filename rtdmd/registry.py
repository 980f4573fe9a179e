"""Registry: method and backend names -> factories, with their options dataclasses.

A package adds a method or a backend with an entry point in its pyproject.toml that names the
factory, and decorates that factory with ``register_method`` / ``register_backend``::

    [project.entry-points."rtdmd_bench.methods"]
    my-method = "my_package.method:make_my_method"

The names come from the installed packages' metadata (importlib.metadata); only the module of
the name asked for is imported, so that ``rtdmd-bench --help`` stays fast and an optional
dependency missing for one backend does not break the others. rtdmd lists its own methods and
backends the same way (pyproject.toml).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from rtdmd.errors import UserError

METHOD_GROUP = "rtdmd_bench.methods"
BACKEND_GROUP = "rtdmd_bench.backends"


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


@functools.lru_cache(maxsize=None)
def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """name -> entry point of ``group`` over every installed package (read once per process)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def available(group: str) -> list[str]:
    """The names of ``group`` whose module exists in this installation."""
    names = []
    for name, ep in entry_points(group).items():
        try:
            found = importlib.util.find_spec(ep.module) is not None
        except ModuleNotFoundError:  # its package is missing
            found = False
        if found:
            names.append(name)
    return sorted(names)


def require_installed(kind: str, group: str) -> None:
    """UserError when no installed package lists any entry point of ``group`` (a source tree never pip-installed)."""
    if not entry_points(group):
        raise UserError(f"no {kind}s are registered because rtdmd-bench is not installed; install it with "
                        "pip install -e . in the project folder so that its entry points exist.")


def load_entry(kind: str, name: str, group: str, table: dict):
    """The entry ``name`` of ``table``, importing the module its entry point names if it is not registered yet.

    UserError for an unknown name (listing the available ones), for a module missing from this installation,
    and for a missing optional dependency of the module.
    """
    if name in table:
        return table[name]
    require_installed(kind, group)
    ep = entry_points(group).get(name)
    if ep is None:
        raise UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(available(group))}.")
    try:
        ep.load()
    except ModuleNotFoundError as exc:
        if exc.name == ep.module:  # not written yet in this version of the project
            raise UserError(f"{kind} '{name}' is not available in this version; choose one of: "
                            f"{', '.join(available(group))}.") from None
        if exc.name and exc.name.split(".")[0] in {"rtdmd", ep.module.split(".")[0]}:
            raise  # a module of the project itself is missing: a bug, not a user error
        raise UserError(f"{kind} '{name}' needs the package '{exc.name}', which is not installed; "
                        "install the extras with pip install 'rtdmd-bench[real,scorers]'.") from None
    if name not in table:
        raise UserError(f"the entry point of {kind} '{name}' ({ep.value}) does not register it; decorate its factory "
                        f"with rtdmd.registry.register_{kind}('{name}', ...).")
    return table[name]


def get_method(name: str) -> MethodEntry:
    return load_entry("method", name, METHOD_GROUP, _METHODS)


def get_backend(name: str) -> BackendEntry:
    return load_entry("backend", name, BACKEND_GROUP, _BACKENDS)
