"""Typed configuration: dataclasses, YAML files per backend x method, ``--set key=value``.

A run's configuration has four sections::

    method:   {name: teacher, ...options of that method}
    backend:  {name: shapes, ...options of that backend}
    train:    the training loop (steps, batch, optimiser, EMA, checkpoints)
    tracking: MLflow

Each method and backend registers an options dataclass (rtdmd.registry); YAML keys are
checked against those dataclasses, so a typo is an error that names the key and lists the
valid ones, and a value of the wrong type is an error that names the expected type.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rtdmd import registry
from rtdmd.errors import UserError
from rtdmd.validate import check_device, check_number

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class OptimConfig:
    """AdamW settings for one network."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr * (1 + cos(pi * step / train.max_steps)) / 2

    def validate(self, prefix: str = "optim"):
        check_number(f"{prefix}.lr", self.lr, low=0.0, hint="a finite learning rate such as 1e-4")
        check_number(f"{prefix}.eps", self.eps, low=0.0, hint="a small positive number such as 1e-8")
        check_number(f"{prefix}.weight_decay", self.weight_decay, low=0.0, hint="a finite number >= 0")
        for b in self.betas:
            check_number(f"{prefix}.betas", b, low=0.0, high=1.0, hint="two numbers in [0, 1] such as [0.9, 0.999]")


def scheduled_lr(o: OptimConfig, step: int, total: int) -> float:
    """The learning rate of 0-based ``step`` of a ``total``-step run under ``o.schedule``."""
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return o.lr


@dataclass
class TrainConfig:
    """The training loop shared by every method."""

    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (with a checkpoint) once the run has trained this many minutes, resumes included; 0 = no limit
    batch_size: int = 32
    seed: int = 0
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.999
    ema_every: int = 1
    # when an EMA copy is updated (docs/paper.md s4b): "update" = inside its network's update, on the
    # iterations where that network steps and step % ema_every == 0; "iteration" = after every iteration
    # with step % ema_every == 0, whether or not the network stepped (the reference code's stage 1)
    ema_on: Literal["update", "iteration"] = "update"
    ema_warmup: bool = False  # decay min((1 + step) / (10 + step), decay) at iteration `step` (docs/paper.md s4b)
    # micro-batches of train.batch_size per optimiser step, gradients accumulated and each loss divided by
    # their number (docs/paper.md s4b); only methods that split their data into micro-batches accept > 1
    accumulate: int = 1
    # apply the EMA once per micro-batch (train.accumulate times in a row) at an EMA step (docs/paper.md s4b)
    ema_per_micro_batch: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10  # MLflow gets the mean of every logged scalar over the last log_every steps
    # on logged steps, the methods' diagnostics (rtdmd.diagnostics): per-term gradient norms, the cosine of
    # consecutive policy gradients, the learned rewards beside their monitor (an oracle) on the same rollouts
    diagnostics: bool = True
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile (nn.Module.compile) the method's networks and the teacher; off = eager
    adamw_impl: Literal["default", "foreach", "fused"] = "default"  # torch.optim.AdamW implementation
    # --max-steps: a cap every stage honours (an rtdmd stage-1 loop has its own max_steps); 0 = none
    max_steps_cap: int = 0

    def __post_init__(self):
        if self.max_steps_cap > 0:
            self.max_steps = min(self.max_steps, self.max_steps_cap)

    def validate(self):
        for name in ("batch_size", "checkpoint_every", "log_every", "ema_every", "accumulate"):
            check_number(f"train.{name}", getattr(self, name), low=1, hint="a positive integer")
        check_number("train.max_steps_cap", self.max_steps_cap, low=0, hint="0 (no cap) or a positive integer")
        check_number("train.grad_clip", self.grad_clip, low=0.0, hint="a finite number (0 disables clipping)")
        check_number("train.ema_decay", self.ema_decay, low=0.0, high=1.0, hint="a number in [0, 1]")
        check_number("train.max_minutes", self.max_minutes, low=0.0, hint="a finite number of minutes (0: no limit)")
        check_device(self.device, "train.device")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "rtdmd-bench"
    run_name: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags of the run (a study's arm, seed, study)


@dataclass
class RunConfig:
    method_name: str
    backend_name: str
    method: Any  # the method's registered options dataclass
    backend: Any  # the backend's registered options dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is dict or origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; convert int->float; raise UserError if wrong."""
    origin = typing.get_origin(tp)
    bad = UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}; fix the value in your config or --set.")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key)
            except UserError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def build_dataclass(cls, data: dict, prefix: str):
    """Instantiate ``cls`` from a mapping, checking every key and value."""
    hints = _hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise UserError(
            f"unknown config key {where}; valid keys under '{prefix or '<top>'}' are: {', '.join(sorted(names))}."
        )
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:  # a validate(prefix) names keys by their full path
        validate(prefix=prefix) if "prefix" in inspect.signature(validate).parameters else validate()
    return obj


def to_dict(obj) -> dict:
    """Dataclass -> plain nested dict (YAML-ready)."""
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """``["train.lr=1e-4", "method.guidance=4"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'; write for example --set train.max_steps=100.")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"--set key '{key}' is malformed; write dotted keys like train.max_steps=100.")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set key '{key}' conflicts with another --set; give each key once.")
        node[parts[-1]] = value
    return out


def read_yaml(path: Path, what: str = "config file", missing_fix: str = "pass an existing YAML file to --config",
              holds: str = "a mapping of sections (method, backend, train, tracking)") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or a non-mapping is one UserError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {missing_fix}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{where}; fix the syntax and retry.") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold {holds}.")
    return data


def default_config_path(backend: str, method: str) -> Path:
    return CONFIG_DIR / backend / f"{method}.yaml"


def preset_path(backend: str, method: str, preset: str) -> Path:
    return CONFIG_DIR / backend / f"{method}@{preset}.yaml"


def resolve(
    method: str,
    backend: str | None = None,
    config_file: Path | None = None,
    overrides: dict | None = None,
    preset: str | None = None,
) -> RunConfig:
    """Build the resolved RunConfig: dataclass defaults < shipped YAML < preset < --config < --set."""

    data: dict = {}
    user = read_yaml(config_file) if config_file is not None else {}
    _check_sections(user)  # before merging: a dict from --set would silently replace a scalar section of the file
    # The backend comes from the CLI, else the user's file, else the method's default.
    if backend is None and isinstance(user.get("backend"), dict):
        backend = user["backend"].get("name")
    method_entry = registry.get_method(method)
    backend = backend or method_entry.default_backend
    backend_entry = registry.get_backend(backend)
    if backend not in method_entry.backends:
        raise UserError(
            f"method '{method}' does not run on backend '{backend}'; choose one of: {', '.join(method_entry.backends)}."
        )
    shipped = default_config_path(backend, method)
    if shipped.is_file():
        data = read_yaml(shipped)
    if preset:
        pp = preset_path(backend, method, preset)
        if not pp.is_file():
            known = sorted(p.stem.split("@", 1)[1] for p in (CONFIG_DIR / backend).glob(f"{method}@*.yaml"))
            raise UserError(f"unknown preset '{preset}' for {method} on {backend}; available presets: {', '.join(known) or 'none'}.")
        data = _deep_merge(data, read_yaml(pp))
    data = _deep_merge(data, user)
    if overrides:
        data = _deep_merge(data, overrides)
    _check_sections(data)
    m = dict(data.get("method") or {})
    b = dict(data.get("backend") or {})
    if m.pop("name", method) != method:
        raise UserError(f"the config file is for another method than '{method}'; remove method.name or use a matching file.")
    if b.pop("name", backend) != backend:
        raise UserError(f"the config says backend.name other than '{backend}'; pass --backend or fix backend.name.")
    return _build_run_config(method, backend, m, b, data)


def config_to_dict(cfg: RunConfig) -> dict:
    return {
        "method": {"name": cfg.method_name, **to_dict(cfg.method)},
        "backend": {"name": cfg.backend_name, **to_dict(cfg.backend)},
        "train": to_dict(cfg.train),
        "tracking": to_dict(cfg.tracking),
    }


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def load_resolved(path: Path) -> RunConfig:
    """Re-read a config.yaml written next to a run or checkpoint."""
    if not Path(path).is_file():
        raise UserError(f"{path} is missing, so this run or checkpoint is incomplete; use another checkpoint or retrain.")
    data = read_yaml(path)
    _check_sections(data)
    try:
        method = data["method"]["name"]
        backend = data["backend"]["name"]
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a resolved run config (method.name and backend.name missing).") from None

    m = {k: v for k, v in data["method"].items() if k != "name"}
    b = {k: v for k, v in data["backend"].items() if k != "name"}
    return _build_run_config(method, backend, m, b, data)


def _check_sections(data: dict) -> None:
    unknown = sorted(set(data) - {"method", "backend", "train", "tracking"})
    if unknown:
        raise UserError(
            f"unknown config section '{unknown[0]}'; valid sections are: backend, method, tracking, train."
        )
    for name in ("method", "backend", "train", "tracking"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise UserError(f"config section '{name}' must be a mapping of keys, got {data[name]!r}; "
                            f"write it as '{name}: {{key: value}}' or set single keys with --set {name}.KEY=VALUE.")


def _build_run_config(method: str, backend: str, m: dict, b: dict, data: dict) -> RunConfig:
    return RunConfig(
        method_name=method,
        backend_name=backend,
        method=build_dataclass(registry.get_method(method).options, m, "method"),
        backend=build_dataclass(registry.get_backend(backend).options, b, "backend"),
        train=build_dataclass(TrainConfig, data.get("train") or {}, "train"),
        tracking=build_dataclass(TrackingConfig, data.get("tracking") or {}, "tracking"),
    )
