"""The one surface every method talks to.

A backend adapts one model family (the shapes world, toy2d, SD3 / SD3.5, FLUX.2) to the
project's conventions (rtdmd.flow): a state x, a noise level sigma in [0, 1], a velocity
v ~ eps - x0, and images in [0, 1]. Methods never import diffusers or transformers; they
only call the methods below, so a new model family plugs in without touching a method.

Networks. Every velocity network a method trains or queries is an ``nn.Module`` returned by
the backend (``teacher``, ``make_trainable(role)``). ``velocity(net, x, sigma, cond)`` is the
only way to call one. A backend may return LoRA-wrapped copies that share the teacher's
weights; ``teacher_velocity`` then disables the adapters instead of holding a second copy.

Conditioning. ``encode_prompts`` returns a ``Cond``: a dict of batch-first tensors (for
SD3: prompt_embeds and pooled_prompt_embeds; for the shapes world: token embeddings and
an attention mask). ``uncond(n)`` returns the empty-prompt conditioning used by CFG.
``cat_cond`` / ``index_cond`` (rtdmd.flow, imported here as part of this interface) operate on any Cond.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from rtdmd.errors import UserError
from rtdmd.flow import Cond, cat_cond, guided_velocity, index_cond  # noqa: F401  (the Cond helpers)


@dataclass
class DataBatch:
    """Real training data, for the backends that have it (shapes, toy2d).

    x0: clean states in the backend's x space; prompts: one caption per row;
    images: the same data as images in [0, 1] (None for toy2d); scenes: ground truth
    (renderer scene descriptions) where the backend has it.
    """

    x0: torch.Tensor
    prompts: list[str]
    images: torch.Tensor | None = None
    scenes: list | None = None


class Backend(abc.ABC):
    """Adapter from a model family to the project's flow conventions."""

    name: str = "base"
    #: True when decode() is meaningful as an image (False for toy2d points).
    has_images: bool = True

    def __init__(self, options, device: torch.device | str = "cpu"):
        self.options = options
        self.device = torch.device(device)

    # ------------------------------------------------------------------ geometry
    @abc.abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample's state x (latent or pixels), without the batch dim."""

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pure noise at sigma = 1, drawn on CPU from ``generator`` (so seeds are device-independent)."""
        z = torch.randn((n, *self.state_shape()), generator=generator)
        return z.to(self.device)

    @abc.abstractmethod
    def sampling_sigmas(self, num_steps: int) -> torch.Tensor:
        """The teacher's Euler schedule: num_steps + 1 decreasing sigmas ending at 0."""

    @abc.abstractmethod
    def generator_sigmas(self, num_steps: int = 4) -> torch.Tensor:
        """The few-step generator's sigmas (num_steps + 1 values ending at 0)."""

    # ------------------------------------------------------------------ text
    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Encode prompts with the (frozen) text encoder(s)."""

    def uncond(self, n: int) -> Cond:
        """Empty-prompt conditioning for classifier-free guidance."""
        return self.encode_prompts([""] * n)

    # ------------------------------------------------------------------ networks
    @property
    @abc.abstractmethod
    def teacher(self) -> nn.Module:
        """The frozen teacher velocity network."""

    @abc.abstractmethod
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v = net(x, sigma, cond) in the project's convention (v ~ eps - x0)."""

    def teacher_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float = 1.0, uncond: Cond | None = None
    ) -> torch.Tensor:
        """Teacher velocity with classifier-free guidance (one batched call for cond and uncond)."""
        return guided_velocity(lambda xx, ss, cc: self.velocity(self.teacher, xx, ss, cc), x, sigma, cond, guidance,
                               uncond if uncond is not None else self.uncond(x.shape[0]))

    @abc.abstractmethod
    def make_trainable(self, role: str) -> nn.Module:
        """A trainable velocity network initialised from the teacher (full copy or LoRA, per options).

        role names what it is for ("generator", "fake_score", "teacher" for teacher training
        from scratch on the toy backends); backends may use it to pick LoRA settings.
        """

    def feature_module(self, net: nn.Module) -> nn.Module:
        """The sub-module of ``net`` whose output is an intermediate feature map (read with a forward
        hook by DMD2's GAN head on the fake score); backends without one raise a UserError."""
        raise UserError(f"backend {self.name} exposes no intermediate features of its networks, so a GAN head on the "
                        "fake score cannot run; set method.gan=false.")

    def trainable_parameters(self, net: nn.Module) -> Iterator[nn.Parameter]:
        """Parameters an optimiser should update (LoRA backends return adapter weights only)."""
        return (p for p in net.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ images
    @abc.abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """States -> images in [0, 1], (B, 3, H, W). Differentiable (callers wrap in no_grad)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> states (the inverse of decode where one exists)."""
        raise NotImplementedError(f"backend {self.name} cannot encode images")

    # ------------------------------------------------------------------ data
    def training_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """Prompts for prompt-only training (distillation, RL)."""
        raise NotImplementedError(f"backend {self.name} has no prompt source")

    def sample_data(self, n: int, generator: torch.Generator) -> DataBatch:
        """Real (x0, prompt) pairs for teacher training and GAN heads, where the backend has data."""
        raise NotImplementedError(f"backend {self.name} has no training data")

    # ------------------------------------------------------------------ persistence
    @abc.abstractmethod
    def network_state(self, net: nn.Module) -> Mapping[str, torch.Tensor]:
        """The tensors that define a trainable network (full weights or adapters only)."""

    @abc.abstractmethod
    def load_network_state(self, net: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of network_state."""

    def export(self, net: nn.Module, directory: Path) -> None:
        """Write a network in the model family's native format (diffusers LoRA, etc.), optional."""
