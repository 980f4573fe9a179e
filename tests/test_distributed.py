"""Multi-process training on CPU (gloo): DDP equals one process, checkpoints cross process counts,
shared per-step decisions, GRPO group sampling, launch commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rtdmd import distributed as D
from rtdmd.errors import UserError
from rtdmd.methods.teacher import TeacherMethod, TeacherOptions
from rtdmd.registry import register_method


class _CheckedTeacher(TeacherMethod):
    """The teacher method, asserting that every rank holds the same step generator before and after its draws."""

    def before_step(self, ctx):
        D.assert_same_on_all_ranks(ctx.generator, f"StepContext.generator before step {ctx.step}")
        D.assert_same_on_all_ranks(torch.randint(1, 5, (1,), generator=D.shared_generator(ctx, "stop")), "stop index")
        super().before_step(ctx)

    def loss(self, network, ctx):
        out = super().loss(network, ctx)
        D.assert_same_on_all_ranks(ctx.generator, f"StepContext.generator after step {ctx.step}")
        return out


@register_method("teacher-ddp-check", TeacherOptions, backends=("toy2d",), default_backend="toy2d")
def _make_checked(cfg, backend):
    return _CheckedTeacher(cfg, backend)


def _config(max_steps: int):
    from rtdmd.api import make_config

    return make_config("teacher-ddp-check", backend="toy2d", overrides={
        "method": {"prefetch": 0, "optim": {"lr": 0.01}, "ema_decay": 0.9},
        "backend": {"hidden": 32, "depth": 2},
        "train": {"max_steps": max_steps, "batch_size": 8, "seed": 3, "checkpoint_every": 2, "keep_checkpoints": 3,
                  "device": "cpu", "num_threads": 1, "grad_clip": 0.5},
        "tracking": {"enabled": False}})


def _train(out: str, max_steps: int, resume: bool = False):
    from rtdmd.trainer import train

    torch.manual_seed(11)  # the trainer does not seed network initialisation; DDP broadcasts rank 0's
    return train(_config(max_steps), out=Path(out), resume=resume, show_progress=False)


def _train_worker(out: str, max_steps: int):
    _train(out, max_steps)
    Path(out, f"world_of_rank{D.rank()}").write_text(str(D.world_size()))


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    d = run / "checkpoints" / f"step_{step:06d}" / "state"
    tensors = {f"{f.stem}/{k}": v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    opt = torch.load(d / "trainer.pt", weights_only=False)["optimizers"]["teacher"]["state"]
    for i, s in opt.items():
        tensors.update({f"adam/{i}/{k}": v for k, v in s.items() if torch.is_tensor(v) and v.numel() > 1})
    return tensors


def _assert_close(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    D.spawn(_train_worker, 2, args=(str(two), 2))  # 2 gloo processes, 2 steps, global batch 8
    assert [(two / f"world_of_rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    _train(str(one), 4)  # 1 process, same global batch, 4 steps (checkpoints at 2 and 4)
    _assert_close(_state(two, 2), _state(one, 2))
    _train(str(two), 4, resume=True)  # the 2-process checkpoint continues in 1 process
    _assert_close(_state(two, 4), _state(one, 4))


def _collectives_worker(out: str):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    r = acc.process_index
    gathered = D.all_gather_tensor(torch.tensor([r, 10 + r]))
    try:
        D.assert_same_on_all_ranks(r, "the rank")
        caught = ""
    except RuntimeError as exc:
        caught = str(exc)
    result = {"rank": r, "world": acc.num_processes, "gathered": gathered.tolist(),
              "broadcast": D.broadcast_object({"from": r})["from"], "caught": caught}
    Path(out, f"rank{r}.json").write_text(json.dumps(result))


def test_collectives_on_two_processes(tmp_path):
    D.spawn(_collectives_worker, 2, args=(str(tmp_path),))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["gathered"] == r1["gathered"] == [0, 10, 1, 11]
    assert r0["broadcast"] == r1["broadcast"] == 0
    assert r0["caught"] == r1["caught"] == "the rank differs across processes (ranks [1] disagree with rank 0)"


def test_launch_commands(monkeypatch):
    argv = ["train", "rtdmd", "--backend", "sd3", "--num-processes", "8", "--accelerate-config=fsdp", "--out", "r"]
    cpu = D.launch_command(argv, 2, cpu=True)
    assert cpu[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=2" in cpu
    assert cpu[cpu.index("rtdmd.cli") + 1:] == ["train", "rtdmd", "--backend", "sd3", "--out", "r"]
    assert D.accelerate_config_path("ddp").name == "ddp.yaml" and D.accelerate_config_path("fsdp").is_file()
    with pytest.raises(UserError, match="accelerate config 'nope.yaml' not found"):
        D.accelerate_config_path("nope.yaml")
    with pytest.raises(UserError, match="at least 2"):
        D.launch_command(argv, 1, cpu=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    gpu = D.launch_command(argv, 8, accelerate_config="fsdp", cpu=False, port=29999)
    assert gpu[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert gpu[gpu.index("--config_file") + 1] == str(D.accelerate_config_path("fsdp"))
    assert gpu[gpu.index("--num_processes") + 1] == "8" and gpu[gpu.index("--main_process_port") + 1] == "29999"
    assert gpu[gpu.index("rtdmd.cli") + 1:] == ["train", "rtdmd", "--backend", "sd3", "--out", "r"]
    with pytest.raises(UserError, match="exceeds the 8 visible GPUs"):
        D.launch_command(argv, 9, cpu=False)


def test_relaunch_runs_the_cli_on_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    rc = D.relaunch(["train", "teacher", "--backend", "toy2d", "--out", str(out), "--max-steps", "2", "--quiet",
                     "--num-processes", "2", "--set", "train.batch_size=8", "--set", "train.device=cpu",
                     "--set", "tracking.enabled=false", "--set", "method.prefetch=0", "--set", "backend.hidden=16"],
                    2, cpu=True)
    assert rc == 0
    meta = json.loads((out / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["method"] == "teacher"


def _lora_grads(out: str | None, rank: int = 0, world: int = 1):
    """Gradients of a LoRA generator handle on a tiny SD3 backend for a fixed global batch of 4."""
    from tiny_real import sd3_components

    from rtdmd.backends.sd3 import SD3Backend, SD3Options

    b = SD3Backend(SD3Options(resolution=32, dtype="fp32", vae_dtype="fp32", lora_rank=4, lora_alpha=8,
                              prompt_cache_dir="", tf32=False), modules=sd3_components(), identity="ddp")
    gen, fake = b.make_trainable("generator"), b.make_trainable("fake_score")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(gen.parameters()) + list(fake.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net = gen
    if world > 1:
        from accelerate import Accelerator

        net = Accelerator(cpu=True).prepare(gen)
    x = torch.randn(4, *b.state_shape(), generator=g)
    cond = {"prompt_embeds": torch.randn(4, 333, 32, generator=g), "pooled_prompt_embeds": torch.randn(4, 24, generator=g)}
    s = torch.rand(4, generator=g)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    local = {k: v[rows] for k, v in cond.items()}
    v = b.velocity(net, x[rows], s[rows], local)
    with torch.no_grad():  # another adapter on the same base between forward and backward
        b.velocity(fake, x[rows], s[rows], local)
    (v - b.teacher_velocity(x[rows], s[rows], local)).square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in gen.parameters()])
    if out is not None and rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
    return grads


def _lora_ddp_worker(out: str):
    _lora_grads(out, D.rank(), D.world_size())


def test_ddp_on_a_lora_handle_averages_adapter_gradients(tmp_path):
    pytest.importorskip("peft")
    D.spawn(_lora_ddp_worker, 2, args=(str(tmp_path),))
    two = torch.load(tmp_path / "grads.pt")
    one = _lora_grads(None)
    assert two.abs().sum() > 0 and torch.allclose(two, one, atol=1e-6, rtol=1e-4)
