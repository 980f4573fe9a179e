"""Python API: run any method on any backend from a script.

Example (toy2d; docs/api.md has one with a user-written reward)::

    from rtdmd.api import make_config, run_training, sample
    cfg = make_config("teacher", backend="toy2d", overrides={"train": {"max_steps": 200}})
    result = run_training(cfg, out="runs/toy-teacher")
    points = sample(result.checkpoint, [""] * 1000)   # (1000, 2)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rtdmd import config as C
from rtdmd import registry, stages
from rtdmd.checkpoint import load_for_inference
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig, generate_batched, sample_seed
from rtdmd.trainer import TrainResult, check_resume_from, default_run_dir


def make_config(method: str, backend: str | None = None, config_file: Path | None = None,
                overrides: dict | None = None, preset: str | None = None) -> C.RunConfig:
    """The resolved config: shipped defaults < preset < config_file < overrides (a nested dict)."""
    return C.resolve(method, backend=backend, config_file=config_file, overrides=overrides, preset=preset)


def run_training(method_or_cfg, backend: str | None = None, config_file: Path | None = None,
                 overrides: dict | None = None, preset: str | None = None, out: Path | None = None,
                 resume: bool | str = False, stage: str | None = None, init: Path | None = None,
                 command: str = "", show_progress: bool = True) -> TrainResult:
    """Train from a method name (resolved like the CLI) or from a ready RunConfig; a method whose options
    declare stages trains them in order (rtdmd.stages).

    ``resume``: True continues the run in ``out``; "auto" continues it if ``out`` holds one and
    starts it otherwise (for scripts that may be rerun after an interruption).
    """
    overrides = dict(overrides or {})
    if isinstance(method_or_cfg, C.RunConfig):
        cfg = method_or_cfg
        method = cfg.method_name
    else:
        method = method_or_cfg
        names = {f.name for f in dataclasses.fields(registry.get_method(method).options)}
        if stage is not None and "stage" not in names:
            raise UserError(f"--stage applies to rtdmd only, not to '{method}'; drop --stage.")
        if init is not None and "init" not in names:
            raise UserError(f"--init is not supported by '{method}'; drop --init.")
        extra: dict = {}
        if stage is not None:
            extra["stage"] = int(stage)
        if init is not None:
            extra["init"] = str(init)
        if extra:
            overrides = C._deep_merge(overrides, {"method": extra})
        cfg = make_config(method, backend=backend, config_file=config_file, overrides=overrides, preset=preset)
    if resume == "auto":
        resume = stages.has_run(cfg, Path(out) if out is not None else default_run_dir(cfg))
    check_resume_from(cfg, resume)
    return stages.run_stages(cfg, out=out, resume=resume, command=command, show_progress=show_progress)


def sample(checkpoint, prompts, seed: int = 0, steps: int | None = None, guidance: float | None = None,
           eta: float | None = None, batch_size: int = 256, device: str = "cpu"):
    """Samples of a trained checkpoint (run or checkpoint directory), one per prompt, with the checkpoint's
    own sampler unless steps / guidance / eta are given: images (B, 3, H, W) in [0, 1], or toy2d points (B, 2).
    Sample i is seeded by (seed, i), as `rtdmd-bench sample` and the evaluation runner do."""
    prompts = list(prompts)
    if not prompts:
        raise UserError("sample() needs at least one prompt (toy2d: \"\" for the whole mixture).")
    _, backend, net, meta = load_for_inference(checkpoint, device=device)
    sc = SamplingConfig.from_meta(meta.get("sampler", {}), steps=steps, guidance=guidance, eta=eta)
    items = [(p, sample_seed(seed, i, 0)) for i, p in enumerate(prompts)]
    return generate_batched(backend, net, items, sc, batch_size=batch_size)
