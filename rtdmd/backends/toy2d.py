"""toy2d: 2-D points, a Gaussian-mixture data distribution and MLP velocity networks.

The world for exact checks: the mixture's rectified-flow velocity is known in closed form
(``gmm_velocity``), so the teacher can be that exact velocity or an MLP trained on samples,
and the reward-tilted target of a mixture is again computable (rtdmd.world.toy2d_targets).

Prompts: "" means the whole mixture; "mode k" means component k alone. The conditioning
is the integer ``mode`` (0 = unconditional, k + 1 = component k), which the MLP embeds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rtdmd import checkpoint as ckpt
from rtdmd import flow
from rtdmd.backends.base import Backend, DataBatch
from rtdmd.errors import UserError
from rtdmd.registry import register_backend


def _default_means() -> list[list[float]]:
    # 8 modes on a circle of radius 2.5: separated by ~1.9, so mode weights are well defined.
    return [[round(2.5 * math.cos(2 * math.pi * k / 8), 6), round(2.5 * math.sin(2 * math.pi * k / 8), 6)] for k in range(8)]


@dataclass
class Toy2DOptions:
    means: list[list[float]] = field(default_factory=_default_means)
    stds: list[float] = field(default_factory=lambda: [0.25] * 8)
    weights: list[float] = field(default_factory=lambda: [1.0 / 8] * 8)
    #: "exact": the closed-form mixture velocity; "shipped": the MLP teacher shipped in
    #: rtdmd/assets/toy2d_teacher; otherwise a path to a checkpoint made by `train teacher --backend toy2d`.
    teacher: str = "exact"
    hidden: int = 128
    depth: int = 3
    shift: float = 1.0
    generator_timesteps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    #: prompts for prompt-only training: "empty" (the whole mixture), "modes" (one mode each), "mixed"
    prompts: Literal["empty", "modes", "mixed"] = "empty"
    #: share of "mode k" prompts replaced by "" during teacher training (CFG dropout is the method's)
    conditional_share: float = 0.5

    def validate(self):
        k = len(self.means)
        if k == 0 or len(self.stds) != k or len(self.weights) != k:
            raise UserError("backend.means, backend.stds and backend.weights must have one entry per mode; fix the toy2d config.")
        if any(len(m) != 2 for m in self.means):
            raise UserError("each entry of backend.means must be a 2-D point [x, y]; fix the toy2d config.")
        if any(s <= 0 for s in self.stds) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise UserError("backend.stds must be positive and backend.weights non-negative with a positive sum.")


def gmm_velocity(x: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                 log_weights: torch.Tensor) -> torch.Tensor:
    """Exact E[eps - x0 | x_s] for x0 ~ sum_k w_k N(mu_k, c_k^2 I), x_s = (1-s) x0 + s eps.

    Given component k, x_s ~ N(m_k, tau_k^2 I) with m_k = (1-s) mu_k, tau_k^2 = (1-s)^2 c_k^2 + s^2;
    E[x0 | x_s, k] = mu_k + (1-s) c_k^2 / tau_k^2 (x - m_k) and E[eps | x_s, k] = s / tau_k^2 (x - m_k);
    the components are weighted by their posterior responsibilities.
    x: (B, 2); sigma: (B,); means (K, 2); stds (K,); log_weights (B, K) or (K,).
    """
    s = sigma.reshape(-1, 1, 1).to(x.dtype)  # (B,1,1)
    mu = means.unsqueeze(0)  # (1,K,2)
    c2 = (stds ** 2).reshape(1, -1, 1)
    m = (1 - s) * mu
    tau2 = (1 - s) ** 2 * c2 + s ** 2  # (B,K,1)
    diff = x.unsqueeze(1) - m  # (B,K,2)
    d = x.shape[-1]
    logp = -0.5 * (diff ** 2).sum(-1) / tau2.squeeze(-1) - 0.5 * d * torch.log(2 * math.pi * tau2.squeeze(-1))
    resp = torch.softmax(logp + log_weights, dim=-1).unsqueeze(-1)  # (B,K,1)
    v_k = s / tau2 * diff - mu - (1 - s) * c2 / tau2 * diff
    return (resp * v_k).sum(1)


class ExactMixtureVelocity(nn.Module):
    """The closed-form velocity of the configured mixture (no parameters)."""

    def __init__(self, means, stds, weights):
        super().__init__()
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32))
        self.register_buffer("stds", torch.tensor(stds, dtype=torch.float32))
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("log_weights", torch.log(w / w.sum()))

    def forward(self, x, sigma, mode):
        k = self.means.shape[0]
        # mode 0: whole mixture; mode j+1: component j alone (log-weight -inf elsewhere)
        lw = self.log_weights.expand(x.shape[0], k).clone()
        cond = mode > 0
        if cond.any():
            onehot = torch.full_like(lw[cond], float("-inf"))
            onehot[torch.arange(int(cond.sum())), (mode[cond] - 1).clamp(0, k - 1)] = 0.0
            lw[cond] = onehot
        return gmm_velocity(x, sigma, self.means, self.stds, lw)


class MLPVelocity(nn.Module):
    """Small MLP v(x, sigma, mode): Fourier features of sigma, an embedding of the mode."""

    def __init__(self, num_modes: int, hidden: int = 128, depth: int = 3, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(freqs, dtype=torch.float32) * math.pi)
        self.mode_embed = nn.Embedding(num_modes + 1, hidden)
        layers: list[nn.Module] = [nn.Linear(2 + 2 * freqs, hidden)]
        self.inp = layers[0]
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth - 1)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, sigma, mode):
        f = sigma.reshape(-1, 1) * self.freqs
        h = self.inp(torch.cat([x, torch.sin(f), torch.cos(f)], dim=-1)) + self.mode_embed(mode)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


_MODE_RE = re.compile(r"^mode (\d+)$")


class Toy2DBackend(Backend):
    name = "toy2d"
    has_images = False

    def __init__(self, options: Toy2DOptions, device="cpu"):
        super().__init__(options, device)
        o = options
        self.num_modes = len(o.means)
        self._means = torch.tensor(o.means, dtype=torch.float32)
        self._stds = torch.tensor(o.stds, dtype=torch.float32)
        w = torch.tensor(o.weights, dtype=torch.float32)
        self._weights = w / w.sum()
        self._teacher: nn.Module | None = None

    # geometry
    def state_shape(self):
        return (2,)

    def sampling_sigmas(self, num_steps):
        return flow.sampling_sigmas(num_steps, self.options.shift).to(self.device)

    def generator_sigmas(self, num_steps=4):
        ts = flow.generator_timesteps(num_steps, self.options.generator_timesteps)
        return flow.timesteps_to_sigmas(ts, self.options.shift).to(self.device)

    # text
    def parse_prompt(self, prompt: str) -> int:
        if prompt == "":
            return 0
        m = _MODE_RE.match(prompt.strip())
        if not m or not (0 <= int(m.group(1)) < self.num_modes):
            raise UserError(f"toy2d prompt '{prompt}' is not understood; use '' (the whole mixture) or 'mode k' with k in 0..{self.num_modes - 1}.")
        return int(m.group(1)) + 1

    def encode_prompts(self, prompts):
        return {"mode": torch.tensor([self.parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)}

    # networks
    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load_teacher().to(self.device).eval().requires_grad_(False)
        return self._teacher

    def _load_teacher(self) -> nn.Module:
        o = self.options
        if o.teacher == "exact":
            return ExactMixtureVelocity(o.means, o.stds, o.weights)
        path = Path(__file__).resolve().parent.parent / "assets" / "toy2d_teacher" if o.teacher == "shipped" else Path(o.teacher)
        step_dir = ckpt.find_checkpoint(path)
        net = self._new_mlp()
        self.load_network_state(net, ckpt.load_model_state(step_dir))
        return net

    def _new_mlp(self) -> MLPVelocity:
        return MLPVelocity(self.num_modes, self.options.hidden, self.options.depth)

    def make_trainable(self, role: str) -> nn.Module:
        net = self._new_mlp().to(self.device)
        if role != "teacher" and isinstance(self.teacher, MLPVelocity):
            net.load_state_dict(self.teacher.state_dict())
        return net.train()

    def velocity(self, net, x, sigma, cond):
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return net(x, sigma.to(x.dtype), cond["mode"])

    # images: the "image" of a point is the point itself (rewards on toy2d are functions of x)
    def decode(self, x):
        return x

    def encode_images(self, images):
        return images

    # data
    def sample_data(self, n: int, generator: torch.Generator) -> DataBatch:
        comp = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        x0 = self._means[comp] + self._stds[comp, None] * torch.randn(n, 2, generator=generator)
        keep = torch.rand(n, generator=generator) < self.options.conditional_share
        prompts = [f"mode {int(c)}" if k else "" for c, k in zip(comp, keep)]
        return DataBatch(x0=x0.to(self.device), prompts=prompts)

    def sample_mixture(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples of the mixture and their component indices."""
        comp = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        return self._means[comp] + self._stds[comp, None] * torch.randn(n, 2, generator=generator), comp

    def training_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        mode = self.options.prompts
        if mode == "empty":
            return [""] * n
        comp = torch.randint(0, self.num_modes, (n,), generator=generator)
        if mode == "modes":
            return [f"mode {int(c)}" for c in comp]
        keep = torch.rand(n, generator=generator) < 0.5
        return [f"mode {int(c)}" if k else "" for c, k in zip(comp, keep)]

    def mode_of(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mode mean (for mode-weight estimates)."""
        return torch.cdist(x.float().cpu(), self._means).argmin(dim=1)

    # persistence
    def network_state(self, net):
        return net.state_dict()

    def load_network_state(self, net, state):
        net.load_state_dict(state)


@register_backend("toy2d", Toy2DOptions, help="2-D Gaussian mixture, MLP velocities, closed-form checks")
def make_toy2d(options: Toy2DOptions, device="cpu") -> Toy2DBackend:
    return Toy2DBackend(options, device)
