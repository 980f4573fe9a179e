"""Exponential moving averages of network weights (the trainer's EMA copies, consistency targets)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, on parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        if p.requires_grad:
            pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay used at iteration ``step``: ``decay``, or with warm-up min((1 + step) / (10 + step), decay)
    (docs/paper.md s4b), which lets the EMA follow the weights closely in the first iterations."""
    return min((1.0 + step) / (10.0 + step), decay) if warmup else decay
