"""A toy2d MLP teacher for method tests, made in seconds.

The MLP is regressed on the mixture's exact velocity (toy2d.gmm_velocity) at random (x_s, s),
then written as a checkpoint, so ``backend.teacher=<dir>`` gives distillation and RL methods a
teacher NETWORK to copy (the exact teacher has no weights). Its 100-step Euler samples match the
mixture within the MMD floor (checked in tests/test_dmd2.py).
"""

from __future__ import annotations

from pathlib import Path

import torch


def fit_mlp_teacher(out: Path, steps: int = 1000, batch: int = 256, lr: float = 2e-3, seed: int = 0) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 128-wide MLP: one thread is fastest, and leaves the other core to others
    try:
        return _fit(out, steps, batch, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(out: Path, steps: int, batch: int, lr: float, seed: int) -> Path:
    from rtdmd import checkpoint as ckpt
    from rtdmd.backends.toy2d import Toy2DBackend, Toy2DOptions

    b = Toy2DBackend(Toy2DOptions())
    exact = b.teacher
    torch.manual_seed(seed)
    net = b._new_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    mode = torch.zeros(batch, dtype=torch.long)  # the prompt "" (the whole mixture)
    for _ in range(steps):
        x0, _ = b.sample_mixture(batch, g)
        s = torch.rand(batch, generator=g)
        xs = (1 - s[:, None]) * x0 + s[:, None] * torch.randn(batch, 2, generator=g)
        with torch.no_grad():
            target = exact(xs, s, mode)
        loss = (net(xs, s, mode) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ckpt.write_checkpoint(out, steps, config_yaml="", sampler={"kind": "euler", "steps": 100, "guidance": 1.0, "eta": 0.9},
                          method="teacher", backend="toy2d", inference_state=net.state_dict(), training_state=None,
                          extra_meta={"role": "teacher"})
    return Path(out)


def teacher_samples(backend, n: int, seed: int, steps: int = 100) -> torch.Tensor:
    """n samples of the backend's teacher for the prompt "" (Euler ODE)."""
    from rtdmd import samplers

    cond = backend.encode_prompts([""] * n)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return samplers.euler_sample(lambda xx, ss: backend.velocity(backend.teacher, xx, ss, cond), x,
                                     backend.sampling_sigmas(steps))
