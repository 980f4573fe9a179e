"""Batched, per-sample-seeded generation from any network of any backend.

Every sample draws its initial noise and its per-step noise from its own generator, seeded
from (seed, prompt index, image index), so any image can be regenerated alone and a batch's
composition never changes a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rtdmd import flow, samplers
from rtdmd.backends.base import Backend
from rtdmd.seeding import torch_generator


@dataclass
class SamplingConfig:
    kind: str = "cps"  # "euler" (teacher ODE) or "cps" (few-step generator)
    steps: int = 4
    guidance: float = 1.0
    eta: float = 0.9

    @classmethod
    def from_meta(cls, sampler: dict, steps=None, guidance=None, eta=None, kind=None) -> "SamplingConfig":
        """The checkpoint's recorded sampler (``sampler``, its meta.json entry), each setting overridable; ``kind``
        runs the weights with the other sampler (a teacher's weights as the few-step CPS generator)."""
        return cls(kind=kind or sampler.get("kind", "cps"), steps=steps or sampler.get("steps", 4),
                   guidance=sampler.get("guidance", 1.0) if guidance is None else guidance,
                   eta=sampler.get("eta", 0.9) if eta is None else eta)


def sample_seed(seed: int, prompt_index: int, image_index: int) -> tuple:
    return (seed, "sample", prompt_index, image_index)


def sigmas_for(backend: Backend, sc: SamplingConfig) -> torch.Tensor:
    return backend.sampling_sigmas(sc.steps) if sc.kind == "euler" else backend.generator_sigmas(sc.steps)


def _noises(backend: Backend, keys: Sequence[tuple], n_steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Initial noise and per-step noises for each sample, from that sample's own generator."""
    x1, steps = [], [[] for _ in range(n_steps)]
    shape = backend.state_shape()
    for key in keys:
        g = torch_generator(*key)
        x1.append(torch.randn(shape, generator=g))
        for i in range(n_steps):
            steps[i].append(torch.randn(shape, generator=g))
    dev = backend.device
    return torch.stack(x1).to(dev), [torch.stack(s).to(dev) for s in steps]


class StepProgress:
    """Moves a progress bar (counted in images) during a batch: after each of its ``steps`` network steps the bar
    shows the batch's images in proportion, so a long batch never looks stalled; ``done()`` completes it."""

    def __init__(self, bar, images: int, steps: int):
        self.bar, self.images, self.steps = bar, int(images), max(int(steps), 1)
        self.calls = self.shown = 0

    def __call__(self) -> None:
        self.calls += 1
        self._show(self.images * min(self.calls, self.steps) // self.steps)

    def done(self) -> None:
        self._show(self.images)

    def _show(self, n: int) -> None:
        if n > self.shown:
            self.bar.update(n - self.shown)
            self.shown = n


@torch.no_grad()
def generate(backend: Backend, net, prompts: Sequence[str], keys: Sequence[tuple], sc: SamplingConfig,
             on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """One batch: prompts[i] with noise from keys[i] -> decoded images in [0, 1] (or states for toy2d);
    ``on_step()`` is called after each sampling step (for progress bars)."""
    sigmas = sigmas_for(backend, sc)
    x, step_noise = _noises(backend, keys, len(sigmas) - 1)
    cond = backend.encode_prompts(list(prompts))
    uncond = backend.uncond(len(prompts)) if sc.guidance != 1.0 else None

    def v_fn(xx, ss):
        v = flow.guided_velocity(lambda a, b, c: backend.velocity(net, a, b, c), xx, ss, cond, sc.guidance, uncond)
        if on_step is not None:
            on_step()
        return v

    if sc.kind == "euler":
        out = samplers.euler_sample(v_fn, x, sigmas)
    else:
        out = samplers.cps_rollout(v_fn, x, sigmas, eta=sc.eta, noises=step_noise).states[-1]
    return backend.decode(out).float().clamp(0, 1) if backend.has_images else backend.decode(out).float()


def generate_batched(backend: Backend, net, items: Sequence[tuple[str, tuple]], sc: SamplingConfig,
                     batch_size: int = 64, on_batch: Callable | None = None, bar=None) -> torch.Tensor:
    """Generate for (prompt, key) items in batches; ``on_batch(start, images)`` lets callers save as they go;
    ``bar`` (a tqdm counted in images) moves after every sampling step."""
    outs = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        step = StepProgress(bar, len(chunk), sc.steps) if bar is not None else None
        imgs = generate(backend, net, [p for p, _ in chunk], [k for _, k in chunk], sc, on_step=step)
        if step is not None:
            step.done()
        if on_batch is not None:
            on_batch(i, imgs)
        else:
            outs.append(imgs.cpu())
    return torch.cat(outs) if outs else torch.empty(0)
