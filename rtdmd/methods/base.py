"""What a method is: which networks it trains, in which order, and one iteration's losses.

The trainer (rtdmd.trainer) owns everything else: optimisers, update ratios, EMA, gradient
clipping, mixed precision, checkpoints, resume, MLflow and the progress bar. A method only
says, for each network it trains, how often it is updated (``Update.every``) and what its
loss is at a given step (``loss``), using layers 1-3 (flow, samplers, objectives) and the
backend. Every random draw comes from the ``generator`` the trainer passes in, which is
derived from (seed, step), so a resumed run repeats the same draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rtdmd.backends.base import Backend
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.seeding import derive_seed, torch_generator


@dataclass
class Update:
    """One optimiser step of one network inside an iteration."""

    network: str
    every: int = 1  # update on iterations where step % every == 0 (two time-scale rule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float | None = None  # keep an EMA copy of this network (None: no EMA)


@dataclass
class SamplerSpec:
    """How a trained network is sampled by default (written into every checkpoint)."""

    kind: str  # "euler" (many-step teacher ODE) or "cps" (few-step generator)
    steps: int
    guidance: float = 1.0
    eta: float = 0.9  # CPS stochasticity (docs/paper.md s2)


@dataclass
class StepContext:
    """Per-step randomness and process layout.

    ``generator`` is identical on every process (shared decisions such as the stop index k
    and the global batch's noise); a process keeps the rows ``shard(n)`` of a global batch of
    n, so a run on P processes draws the same numbers as a run on one.
    """

    step: int  # 0-based iteration index
    generator: torch.Generator  # torch draws for this step (CPU generator, same on all ranks)
    seed: int  # integer seed of this step (for numpy / hashing)
    rank: int = 0
    world_size: int = 1
    micro_batches: int = 1  # train.accumulate: micro-batches per optimiser step (docs/paper.md s4b)
    micro: int = 0  # which micro-batch a loss call is for
    diagnose: bool = False  # a logged step with train.diagnostics on: methods compute their diagnostics (rtdmd.diagnostics)

    def micro_batch(self, j: int) -> "StepContext":
        """The context of micro-batch ``j`` of this step: the step's own for j = 0, else one whose seed and
        generator are derived from (step seed, j), so each micro-batch draws its own data and a resumed run
        repeats them."""
        if j == 0:
            return self
        seed = derive_seed(self.seed, f"micro{j}")
        return dataclasses.replace(self, generator=torch_generator(seed), seed=seed, micro=j)

    def shard(self, n_global: int) -> slice:
        """This process's rows of a global batch of ``n_global`` rows."""
        per = n_global // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


class Method:
    """Base class; subclasses set ``networks`` and ``updates`` and implement ``loss``."""

    #: the network sampled at inference (its EMA copy is used when one exists)
    inference_network: str = "generator"
    #: whether ``loss`` serves micro-batches (``ctx.micro`` of ``ctx.micro_batches``), so train.accumulate may exceed 1
    accumulates: bool = False

    def __init__(self, cfg: RunConfig, backend: Backend):
        self.cfg = cfg
        self.options = cfg.method
        self.backend = backend
        self.networks: dict[str, nn.Module] = {}
        self.updates: list[Update] = []

    # -- what the trainer calls -------------------------------------------------
    def loss(self, network: str, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss whose gradient updates ``network`` at this step, and scalars to log."""
        raise NotImplementedError

    def before_step(self, ctx: StepContext) -> None:
        """Work shared by the updates of one iteration (e.g. a rollout), done once per step."""

    def step_logs(self, ctx: StepContext, logs: dict[str, float]) -> dict[str, float]:
        """Scalars of the whole step, logged beside ``logs`` (the updates' losses, scalars and grad norms),
        called once after the step's updates; diagnostics when ``ctx.diagnose``."""
        return {}

    def sampler(self) -> SamplerSpec:
        """Default sampling of the inference network (written into checkpoints)."""
        raise NotImplementedError

    def inference_role(self) -> str:
        """The backend role used to rebuild the inference network when loading a checkpoint."""
        return self.inference_network

    def state_dict(self) -> dict[str, Any]:
        """Extra method state to checkpoint (most methods have none: draws are per-step)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release background resources (prefetch threads); called when training ends."""
