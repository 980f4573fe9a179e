"""Shipped configs of the real backends: every backend x method file (and preset) has valid backend
and train sections; the method sections are validated by each method's options when it registers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rtdmd.config import CONFIG_DIR, TrainConfig, build_dataclass

METHODS = ["dmd2", "lcm", "hypersd", "flow-grpo", "ac-dmd", "rtdmd"]


@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_every_method_has_a_valid_real_config(kind):
    from rtdmd.backends.flux2 import Flux2Options
    from rtdmd.backends.sd3 import SD3Options

    options = {"sd3": SD3Options, "flux2": Flux2Options}[kind]
    files = sorted((CONFIG_DIR / kind).glob("*.yaml"))
    assert {f.stem for f in files if "@" not in f.stem} == set(METHODS)
    for f in files:
        base = yaml.safe_load((CONFIG_DIR / kind / (f.stem.split("@")[0] + ".yaml")).read_text())
        over = yaml.safe_load(f.read_text())
        backend = {**base["backend"], **(over.get("backend") or {})}
        train = {**base["train"], **(over.get("train") or {})}
        b = build_dataclass(options, backend, "backend")
        t = build_dataclass(TrainConfig, train, "train")
        assert b.lora_rank == 32 and b.lora_alpha == 64.0 and b.dtype == "bf16"  # docs/paper.md s3
        assert t.batch_size % 8 == 0, f"{f.name}: the global batch must split over 8 GPUs"
        assert "guidance" in {**base["method"], **(over.get("method") or {})} or base["method"].get("phases")


def test_paper_values_by_variant():
    sd3 = CONFIG_DIR / "sd3"
    load = lambda p: yaml.safe_load(Path(p).read_text())  # noqa: E731
    assert load(sd3 / "ac-dmd.yaml")["method"]["guidance"] == 7.0  # SD3-M (docs/paper.md s3)
    assert load(sd3 / "ac-dmd@sd3.5-medium.yaml")["method"]["guidance"] == 4.5  # SD3.5-M
    assert load(CONFIG_DIR / "flux2" / "ac-dmd.yaml")["method"]["guidance"] == 4.0  # klein base
    assert load(CONFIG_DIR / "flux2" / "ac-dmd.yaml")["method"]["generator_optim"]["lr"] == 1e-6
    assert load(CONFIG_DIR / "flux2" / "rtdmd@klein-base-9b.yaml")["method"]["consistency_weight"] == 0.0
