"""Typed configs: precedence of the layers, coercion, Literal and list validation, saved resolved configs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml

from rtdmd import config as C
from rtdmd.errors import UserError
from runhelp import train_args

# ---------------------------------------------------------------------------- precedence


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_on_the_shipped_shapes_teacher(tmp_path):
    """dataclass defaults < shipped YAML < preset < --config < --set, key by key."""
    user = _write(tmp_path / "user.yaml", {"train": {"max_steps": 300, "seed": 5},
                                           "backend": {"unet_layers_per_block": 3}})
    sets = C.parse_set(["train.max_steps=7", "backend.unet_layers_per_block=4"])

    shipped = C.resolve("teacher", backend="shapes")
    preset = C.resolve("teacher", backend="shapes", preset="unet2")
    with_file = C.resolve("teacher", backend="shapes", preset="unet2", config_file=user)
    with_set = C.resolve("teacher", backend="shapes", preset="unet2", config_file=user, overrides=sets)

    assert C.TrainConfig().max_steps == 1000  # the dataclass default ...
    assert [c.train.max_steps for c in (shipped, preset, with_file, with_set)] == [6000, 4500, 300, 7]
    assert [c.backend.unet_layers_per_block for c in (shipped, preset, with_file, with_set)] == [1, 2, 3, 4]
    # a key no layer sets keeps the dataclass default; a key only the shipped YAML sets survives the preset
    assert all(c.train.ema_every == 1 and c.backend.text_width == 128 for c in (shipped, with_set))
    assert [c.train.keep_checkpoints for c in (shipped, preset, with_set)] == [3, 3, 3]
    assert C.TrainConfig().keep_checkpoints == 2
    # the file's other key survives --set; unrelated nested keys survive a partial nested override
    assert with_set.train.seed == 5
    assert with_set.method.optim.lr == 0.001 and with_set.method.optim.betas == [0.9, 0.999]


def test_precedence_through_the_cli_and_the_saved_config(cli, tmp_path, monkeypatch):
    """The same layers through `rtdmd-bench train` (toy2d, a preset added in a temporary config dir); the run dir
    and its checkpoint hold exactly the resolved config."""
    cdir = tmp_path / "configs" / "toy2d"
    cdir.mkdir(parents=True)
    (cdir / "teacher.yaml").write_text((C.CONFIG_DIR / "toy2d" / "teacher.yaml").read_text())
    _write(cdir / "teacher@quick.yaml", {"method": {"sample_steps": 9, "logit_std": 2.0}, "backend": {"shift": 2.0}})
    monkeypatch.setattr(C, "CONFIG_DIR", tmp_path / "configs")
    user = _write(tmp_path / "user.yaml", {"method": {"logit_std": 3.0}, "backend": {"shift": 3.0}})
    run = tmp_path / "run"
    args = train_args("toy2d", run, 2, "backend.shift=4", "train.max_steps=99",
                      extra=("--preset", "quick", "--config", user))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    cfg = C.load_resolved(run / "config.yaml")
    assert cfg.method.sample_steps == 9  # preset over shipped (50)
    assert cfg.method.logit_std == 3.0  # --config over preset
    assert cfg.backend.shift == 4.0  # --set over --config
    assert cfg.train.max_steps == 2  # --max-steps over --set train.max_steps
    assert cfg.train.batch_size == 8 and cfg.method.optim.lr == 0.01  # --set over shipped
    assert cfg.method.prompt_dropout == 0.1 and cfg.train.log_every == 50  # shipped values untouched
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    expected = C.resolve("teacher", backend="toy2d", preset="quick", config_file=user,
                         overrides=C._deep_merge(C.parse_set(sets), {"train": {"max_steps": 2, "max_steps_cap": 2}}))
    assert cfg == expected
    assert (run / "config.yaml").read_text() == C.dump(expected)
    assert (run / "checkpoints" / "step_000002" / "config.yaml").read_text() == C.dump(expected)


def test_backend_from_config_file(tmp_path):
    f = _write(tmp_path / "c.yaml", {"backend": {"name": "toy2d", "hidden": 8}})
    cfg = C.resolve("teacher", config_file=f)
    assert cfg.backend_name == "toy2d" and cfg.backend.hidden == 8
    assert C.resolve("teacher").backend_name == "shapes"  # the method's default backend


# ---------------------------------------------------------------------------- values


def test_int_to_float_and_float_to_int_coercion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method:\n  optim: {lr: 1e-4}\ntrain: {batch_size: 8.0, grad_clip: 2}\n")  # YAML reads 1e-4 as a string
    cfg = C.resolve("teacher", backend="toy2d", config_file=f,
                    overrides=C.parse_set(["method.logit_std=1", "tracking.run_name=123"]))
    assert cfg.method.optim.lr == 1e-4 and type(cfg.method.optim.lr) is float
    assert cfg.method.logit_std == 1.0 and type(cfg.method.logit_std) is float
    assert cfg.train.grad_clip == 2.0 and type(cfg.train.grad_clip) is float
    assert cfg.train.batch_size == 8 and type(cfg.train.batch_size) is int
    assert cfg.tracking.run_name == "123"


@pytest.mark.parametrize("value, tp, expected", [
    (1, float, 1.0), ("2.5e-3", float, 2.5e-3), (4.0, int, 4), (True, bool, True), ("x", str, "x"), (7, str, "7"),
    (None, int | None, None), (3, int | None, 3), ("bf16", Literal["no", "fp16", "bf16"], "bf16"),
    ([1, 2.0], list[int], [1, 2]), ([[0, 1], [2, 3]], list[list[float]], [[0.0, 1.0], [2.0, 3.0]]),
    ((0.9, 0.99), list[float], [0.9, 0.99]),
])
def test_coerce_accepts(value, tp, expected):
    out = C.coerce(value, tp, "k")
    assert out == expected and type(out) is type(expected)
    if isinstance(expected, list) and expected and isinstance(expected[0], list):
        assert all(type(v) is float for row in out for v in row)


@pytest.mark.parametrize("value, tp, words", [
    ("abc", float, "a number"), (True, float, "a number"), (True, int, "an integer"), (2.5, int, "an integer"),
    ("3", int, "an integer"), (1, bool, "true or false"), ([1], str, "a string"),
    ("fp32", Literal["no", "fp16", "bf16"], "one of 'no', 'fp16', 'bf16'"),
    ("x", int | None, "an integer or null"), (0.9, list[float], "a list of a number"),
    ([1, "x"], list[int], "'k[1]' must be an integer"), (5, C.OptimConfig, "OptimConfig"),
])
def test_coerce_rejects_with_the_key_and_the_type(value, tp, words):
    with pytest.raises(UserError) as e:
        C.coerce(value, tp, "k")
    msg = str(e.value)
    assert msg.startswith("config key 'k") and words in msg and "fix the value" in msg


def test_literal_choices_in_run_configs():
    ok = C.resolve("teacher", backend="shapes", overrides={"backend": {"denoiser": "sd3"},
                                                            "method": {"sigma_sampling": "uniform"}})
    assert ok.backend.denoiser == "sd3" and ok.method.sigma_sampling == "uniform"
    with pytest.raises(UserError, match=r"'backend.denoiser' must be one of 'unet', 'sd3', got 'dit'"):
        C.resolve("teacher", backend="shapes", overrides={"backend": {"denoiser": "dit"}})


def test_lists_replace_not_merge():
    cfg = C.resolve("teacher", backend="shapes", overrides=C.parse_set(["backend.unet_channels=[8, 16]",
                                                                       "backend.generator_timesteps=[1000, 500]"]))
    assert cfg.backend.unet_channels == [8, 16]
    assert cfg.backend.generator_timesteps == [1000.0, 500.0] and all(type(t) is float for t in cfg.backend.generator_timesteps)
    with pytest.raises(UserError, match=r"backend.unet_channels\[1\]"):
        C.resolve("teacher", backend="shapes", overrides=C.parse_set(["backend.unet_channels=[8, wide]"]))


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(UserError) as e:
        C.resolve("teacher", backend="toy2d", overrides={"method": {"optim": {"lr": 1, "beta": 2}}})
    assert "'method.optim.beta'" in str(e.value) and "betas, eps, lr, schedule, weight_decay" in str(e.value)
    with pytest.raises(UserError, match="unknown config section 'optim'"):
        C.resolve("teacher", backend="toy2d", overrides={"optim": {"lr": 1}})


def test_validate_runs_after_building():
    with pytest.raises(UserError, match="prompt_dropout"):
        C.resolve("teacher", backend="toy2d", overrides={"method": {"prompt_dropout": 1.0}})
    with pytest.raises(UserError, match="size_range"):
        C.resolve("teacher", backend="shapes", overrides={"backend": {"size_range": [10, 40]}})


# ---------------------------------------------------------------------------- --set parsing and helpers


def test_parse_set():
    got = C.parse_set(["train.max_steps=100", "method.optim.betas=[0.8, 0.9]", "tracking.enabled=false",
                       "tracking.run_name=a=b", "tracking.experiment=", "method.optim.lr=1e-4", "backend.teacher=~/x y"])
    assert got == {"train": {"max_steps": 100}, "method": {"optim": {"betas": [0.8, 0.9], "lr": "1e-4"}},
                   "tracking": {"enabled": False, "run_name": "a=b", "experiment": ""},
                   "backend": {"teacher": "~/x y"}}
    assert C.parse_set(["method.optim.lr=1.5"])["method"]["optim"]["lr"] == 1.5
    for bad in (["train.seed"], ["=3"], ["train.=3"], [".seed=1"]):
        with pytest.raises(UserError):
            C.parse_set(bad)


def test_flatten_and_deep_merge():
    assert C.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    base = {"a": {"b": 1, "c": 2}, "l": [1, 2, 3]}
    assert C._deep_merge(base, {"a": {"c": 3}, "l": [9]}) == {"a": {"b": 1, "c": 3}, "l": [9]}
    assert base == {"a": {"b": 1, "c": 2}, "l": [1, 2, 3]}  # inputs untouched


def test_dump_and_load_resolved_round_trip(tmp_path):
    cfg = C.resolve("teacher", backend="shapes", preset="sd3p2", overrides=C.parse_set(["train.seed=3"]))
    f = tmp_path / "config.yaml"
    f.write_text(C.dump(cfg))
    again = C.load_resolved(f)
    assert again == cfg and C.dump(again) == C.dump(cfg)
    assert yaml.safe_load(f.read_text())["method"]["name"] == "teacher"


@pytest.mark.parametrize("backend, yaml_file", [(p.parent.name, p) for p in sorted(C.CONFIG_DIR.glob("*/teacher*.yaml"))])
def test_every_shipped_teacher_config_resolves(backend, yaml_file):
    preset = yaml_file.stem.split("@", 1)[1] if "@" in yaml_file.stem else None
    cfg = C.resolve("teacher", backend=backend, preset=preset)
    assert cfg.backend_name == backend and cfg.train.max_steps > 0


def test_shipped_teacher_asset_config_loads():
    cfg = C.load_resolved(Path(C.__file__).parent / "assets" / "shapes_teacher" / "config.yaml")
    assert cfg.method_name == "teacher" and cfg.backend.unet_channels == [32, 64, 128]


def test_scheduled_lr_constant_and_cosine_hand_values():
    from rtdmd.config import OptimConfig, scheduled_lr

    const = OptimConfig(lr=0.01)
    assert scheduled_lr(const, 0, 100) == scheduled_lr(const, 99, 100) == 0.01
    cos = OptimConfig(lr=0.01, schedule="cosine")
    assert scheduled_lr(cos, 0, 100) == pytest.approx(0.01)
    assert scheduled_lr(cos, 50, 100) == pytest.approx(0.005)  # cos(pi / 2) = 0
    assert scheduled_lr(cos, 25, 100) == pytest.approx(0.01 * (1 + 2 ** -0.5) / 2)
    assert scheduled_lr(cos, 100, 100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError, match="schedule"):
        C.resolve("teacher", backend="toy2d", overrides={"method": {"optim": {"schedule": "linear"}}})
