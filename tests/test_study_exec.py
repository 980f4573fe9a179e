"""Study runner features: an arm's sampler override (the teacher's weights as the 4-step CPS generator), FD-shapes
per image with a bootstrap interval, and a learning-rate sweep on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.study import execute
from benchmarks.study.spec import load_study
from rtdmd.errors import UserError
from tests.eval_fixtures import ckpt, one_torch_thread, tiny_bundle  # noqa: F401 (fixtures)
from tests.test_study import TINY, toy_teacher  # noqa: F401 (a module-scoped toy2d teacher fixture)


def _write(tmp_path: Path, data: dict, name: str = "s") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------------------- sampler: the step-0 arm


def test_sampler_mistakes_are_one_sentence(tmp_path):
    base = {"backend": "toy2d", "eval": {"suites": ["toy2d"]}}
    cases = [({"a": {"checkpoint": "x", "sampler": "ddim"}}, "sampler 'ddim'; use euler or cps"),
             ({"a": {"checkpoint": "x", "sampler": "euler", "eta": 0.5}}, "eta for the euler sampler")]
    for arms, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            load_study(_write(tmp_path, {**base, "arms": arms}))
    assert load_study(_write(tmp_path, {**base, "arms": {"a": {"checkpoint": "x", "sampler": "cps"}}})).arms["a"].sampler == "cps"


def test_cps_arm_runs_the_teachers_weights_as_the_4_step_generator(tmp_path, toy_teacher):
    """Two arms of one checkpoint: its own sampler (Euler, 8 steps) and `sampler: cps` (4 steps, eta 0.9)."""
    import torch

    from rtdmd.checkpoint import find_checkpoint, load_for_inference
    from rtdmd.generate import SamplingConfig, generate_batched, sample_seed

    path = _write(tmp_path, {"backend": "toy2d", "out": str(tmp_path / "out"),
                             "eval": {"suites": ["toy2d"], "prompts": 2, "images_per_prompt": 4, "bootstrap": 100},
                             "arms": {"teacher": {"checkpoint": str(toy_teacher), "steps": 8},
                                      "step0": {"checkpoint": str(toy_teacher), "sampler": "cps", "steps": 4, "eta": 0.9}}})
    execute.run_study(path, progress=False)
    s = load_study(path)
    units = {a: json.loads((s.out / json.loads((execute.arm_dir(s, a, 0) / "eval.json").read_text())["final"]).read_text())
             for a in ("teacher", "step0")}
    assert units["teacher"]["metrics"] != units["step0"]["metrics"]
    _, backend, net, meta = load_for_inference(find_checkpoint(toy_teacher))
    assert meta["sampler"]["kind"] == "euler"
    x = generate_batched(backend, net, [("mode 0", sample_seed(0, 1, k)) for k in range(4)],
                         SamplingConfig(kind="cps", steps=4, eta=0.9)).double()
    mean, std = torch.tensor(backend.options.means[0]).double(), float(backend.options.stds[0])
    logp = -((x - mean) ** 2).sum(1) / (2 * std ** 2) - 2 * np.log(std) - np.log(2 * np.pi)
    got = [units["step0"]["metrics"]["toy2d/log_density"][f"1:{k}"] for k in range(4)]
    assert got == pytest.approx(logp.tolist())


def test_the_image_cache_keys_on_the_sampler(tmp_path, ckpt):
    """One checkpoint with its own sampler (cps) and with euler: separate image folders, different images."""
    from benchmarks import runner

    def opts(**kw):
        return runner.EvalOptions(suites=["geneval"], max_prompts=2, images_per_prompt=1, tracking=False,
                                  out=tmp_path / "evals", progress=False, batch_size=4, **kw)

    (own,) = runner.run_eval([ckpt], opts())
    (euler,) = runner.run_eval([ckpt], opts(sampler="euler"))
    assert own.image_dir.name.startswith("cps-s2") and euler.image_dir.name.startswith("euler-s2")
    assert euler.generated == 2  # nothing reused from the cps folder
    png = sorted(own.image_dir.rglob("*.png"))[0].relative_to(own.image_dir)
    assert (own.image_dir / png).read_bytes() != (euler.image_dir / png).read_bytes()
    with pytest.raises(UserError, match="sampler must be euler or cps"):
        runner.run_eval([ckpt], opts(sampler="ddim"))
