"""Adding a method is one file + one config + one registration: the example method of
docs/DEVELOPING-methods.md (tests/example_method.py) trains 2 steps on toy2d through rtdmd.api."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from rtdmd import checkpoint as ckpt
from rtdmd import registry
from rtdmd.api import make_config, run_training, sample
from rtdmd.seeding import derive_seed

CONFIG = """\
method:
  guidance: 1.0
  ttur: 1
  generator_optim: {lr: 1.0e-2}
backend:
  teacher: exact
  hidden: 16
  depth: 2
train:
  max_steps: 2
  batch_size: 16
  checkpoint_every: 2
tracking:
  enabled: false
"""


def test_a_new_method_trains_through_the_api(tmp_path):
    import tests.example_method as example  # registers "example-one-step-dmd"

    assert registry.get_method("example-one-step-dmd").options is example.OneStepDmdOptions
    config = tmp_path / "example.yaml"
    config.write_text(CONFIG)
    cfg = make_config("example-one-step-dmd", config_file=config)
    assert cfg.backend_name == "toy2d" and cfg.method.generator_optim.lr == 1e-2
    start = initial_generator(cfg)

    result = run_training("example-one-step-dmd", config_file=config, out=tmp_path / "run", show_progress=False)
    assert result.steps == 2 and result.checkpoint == ckpt.find_checkpoint(tmp_path / "run")
    assert ckpt.read_meta(result.checkpoint)["sampler"] == {"kind": "cps", "steps": 1, "guidance": 1.0, "eta": 1.0}
    assert {"dm/grad_norm", "fake/dsm"} <= result.last_logs.keys()  # both loss blocks ran
    # the generator's weights moved from their initial values
    trained = load_file(str(result.checkpoint / "state" / "net_generator.safetensors"))
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], v) for k, v in start.items())
    points = sample(result.checkpoint, [""] * 8)
    assert points.shape == (8, 2) and torch.isfinite(points).all()


def initial_generator(cfg) -> dict:
    """The generator's weights before training, built as the trainer builds them (same seed)."""
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))
    backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, torch.device("cpu"))
    method = registry.get_method(cfg.method_name).factory(cfg, backend)
    return {k: v.clone() for k, v in method.networks["generator"].state_dict().items()}
