#!/usr/bin/env python
"""How much signal one GRPO batch carries: the policy gradient of independent batches on a frozen policy.

A GRPO step follows the policy gradient estimated from one batch of grouped rollouts. When the batch is too
small, that estimate is mostly noise and the updates are a random walk (consecutive gradients at cosine ~0,
docs/rtdmd.md "Diagnostics"). Here the policy does not move: ``--batches`` M independent batches (each
``train.batch_size`` rollouts in ``method.group_size`` groups, the method's own rollout, rewards, advantages
and trained steps) give M gradients of the policy term g_1..g_M, and

- the mean cosine c over all pairs (g_i, g_j): for a mean of n i.i.d. per-rollout terms,
  E<g_i, g_j> = |mu|^2 and E|g|^2 = |mu|^2 + tr(Sigma) / n, so c ~ |mu|^2 / (|mu|^2 + tr(Sigma) / n);
- the rollouts per step at which two independent estimates would reach cosine 0.5 (signal = noise):
  n (1 - c) / c, with a bootstrap interval resampling the batches (printed as "n/a" when c <= 0);
- the reward per group: mean, the share of groups whose K rewards are all equal (advantage 0, no gradient)
  and the mean within-group standard deviation.

The method is Flow-GRPO (configs: the shipped shapes flow-grpo.yaml plus ``--set``), from the teacher or a
checkpoint (``--init``; a few-step checkpoint is a CPS policy). One thread; CPU-seconds per batch printed.

    OMP_NUM_THREADS=1 python -m benchmarks.grpo_signal --batches 8 [--init RUN_DIR] [--set method.guidance=4.0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtdmd.api import make_config
from rtdmd.config import parse_set
from rtdmd.diagnostics import cosine, flat_grad
from rtdmd.errors import UserError
from rtdmd.methods.base import StepContext
from rtdmd.seeding import step_seed, torch_generator


def signal_of(cosines: list[float], n: int) -> float | None:
    """Rollouts per batch at which two independent gradient estimates have cosine 0.5, from the mean pairwise
    cosine ``c`` of estimates from ``n`` rollouts: n (1 - c) / c; None when c <= 0 (no signal measured)."""
    c = sum(cosines) / len(cosines)
    return n * (1 - c) / c if c > 0 else None


def cosine_matrix(grads: list[torch.Tensor]) -> torch.Tensor:
    """(M, M) cosines of every pair of the M gradients."""
    return torch.tensor([[cosine(x, y) for y in grads] for x in grads])


def batch_bootstrap(cos: torch.Tensor, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean pairwise cosine of a ``cosine_matrix``, resampling the batches (pairs of one batch
    with itself skipped)."""
    m = cos.shape[0]
    g = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(n_boot):
        idx = torch.randint(m, (m,), generator=g)
        a, b = torch.triu_indices(m, m, 1)
        keep = idx[a] != idx[b]
        if keep.any():
            boot.append(float(cos[idx[a][keep], idx[b][keep]].mean()))
    boot.sort()
    return boot[int(0.025 * len(boot))], boot[max(0, int(0.975 * len(boot)) - 1)]


def group_stats(rewards: torch.Tensor, group_size: int) -> tuple[float, float]:
    """(share of groups whose rewards are all equal, mean within-group standard deviation) of (B,) rewards."""
    g = rewards.reshape(-1, group_size)
    flat = (g.max(dim=1).values - g.min(dim=1).values) == 0
    return float(flat.float().mean()), float(g.std(dim=1, unbiased=False).mean())


def measure(cfg, batches: int):
    """The method (its policy left unchanged), the policy-term gradient of each of ``batches`` independent batches,
    and per batch (share of flat groups, mean within-group std, mean reward, CPU-seconds)."""
    from benchmarks.perf import method_driver as D

    stats = []
    with tempfile.TemporaryDirectory() as d:
        tr = D.setup_trainer(cfg, Path(d) / "run")
        m = tr.method
        net = m.networks["generator"]
        params = list(tr.backend.trainable_parameters(net))
        grads = []
        for i in range(batches):
            c0 = time.process_time()
            seed = step_seed(cfg.train.seed, i)
            m.before_step(StepContext(step=i, generator=torch_generator(seed), seed=seed))
            terms, _ = m.policy_loss.terms(net, m.batch, m.steps)
            grads.append(flat_grad(terms["policy"], params).detach())
            r = sum(w * m.batch.rewards[k] for k, w in m.options.rewards.items())
            stats.append((*group_stats(r, m.options.group_size), float(r.mean()), time.process_time() - c0))
        D.release(tr)
    return m, grads, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=8, help="independent batches (gradients) on the frozen policy")
    p.add_argument("--init", default="", help="a checkpoint to start from (default: the shipped teacher)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        if a.batches < 2:
            raise UserError(f"--batches must be at least 2 (got {a.batches}): a cosine needs two gradients.")
        over = parse_set(a.set)
        over.setdefault("method", {})
        if a.init:
            over["method"]["init"] = a.init
        over.setdefault("train", {}).update(device="cpu", num_threads=1, seed=a.seed)
        over.setdefault("tracking", {})["enabled"] = False
        cfg = make_config("flow-grpo", backend="shapes", overrides=over)
        torch.set_num_threads(1)
        m, grads, stats = measure(cfg, a.batches)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = cfg.train.batch_size
    cos = cosine_matrix(grads)
    i, j = torch.triu_indices(len(grads), len(grads), 1)
    pairs = cos[i, j].tolist()
    lo, hi = batch_bootstrap(cos, a.bootstrap)
    c = sum(pairs) / len(pairs)
    need = signal_of(pairs, n)
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
    print(f"policy: {'checkpoint ' + a.init if a.init else 'the shipped teacher'}; kernel {m.kernel}, "
          f"{len(m.sigmas) - 1} steps, guidance {m.policy_guidance}; trained steps per batch: {len(m.steps)}; "
          f"rewards {m.options.rewards}")
    flat, spread, mean, secs = (sum(col) / len(col) for col in zip(*stats))
    print(f"batches: {a.batches} x {n} rollouts ({n // m.options.group_size} groups of {m.options.group_size}); "
          f"CPU-s per batch (rollout + gradient): {secs:.1f}")
    print(f"reward: mean {mean:.3f}; groups with all rewards equal: {100 * flat:.0f} %; mean within-group std {spread:.3f}")
    print(f"gradient norm: mean {sum(float(x.norm()) for x in grads) / len(grads):.3e}; "
          f"norm of the mean over batches {float(torch.stack(grads).mean(0).norm()):.3e}")
    print(f"pairwise cosine of batch gradients: mean {c:+.4f} [{lo:+.4f}, {hi:+.4f}] over {len(pairs)} pairs")
    print(f"rollouts per step for cosine 0.5 (signal = noise): {fmt(need)} "
          f"[{fmt(signal_of([hi], n))}, {fmt(signal_of([lo], n))}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
