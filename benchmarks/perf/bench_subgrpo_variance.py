"""Variance of RTDMD's policy-gradient estimate: GRPO on all stochastic steps vs SubGRPO (docs/paper.md s4, claim c).

At FIXED generator parameters (a stage-1 checkpoint), draw R independent epochs (fresh prompts, initial
latents, noises and, for SubGRPO, step subsets), compute the gradient of the GRPO term alone (bp_weight = 0,
dm_weight = 0) each time, and report over the R gradient vectors g_r:

    total variance  V = mean_r |g_r - mean g|^2        (trace of the estimator's covariance)
    relative variance V / |mean g|^2                   (noise per unit of signal; scale-free)

Both estimators average the PPO term over their trained steps, so their means agree in expectation
(docs/rtdmd.md): the ratio SubGRPO / GRPO-all of V is the variance of the update (target: below 1).
It mixes two effects, so the term of each trained step alone is also reported: there SubGRPO's
group-shared noise at the other steps is the only difference (the mechanism docs/paper.md s4 describes).

    python benchmarks/perf/bench_subgrpo_variance.py --backend toy2d --checkpoint runs/toy2d-exact/stage1
    python benchmarks/perf/bench_subgrpo_variance.py --backend shapes --checkpoint runs/shapes-study/ac-dmd \
        --repeats 24 --groups 4 --group-size 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.toy2d_exact_check import REWARD_NAME, mode_reward
from rtdmd.api import make_config
from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d
from rtdmd.config import _deep_merge
from rtdmd.methods.base import StepContext
from rtdmd.methods.rtdmd import RtdmdMethod
from rtdmd.registry import get_backend
from rtdmd.rewards.registry import register_reward
from rtdmd.seeding import step_seed, torch_generator


def gradient_samples(method, repeats: int, seed: int = 0) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """At fixed parameters, for R independent epochs: the (R, P) gradients of the generator loss, and per
    stochastic step i the (R_i, P) gradients of the PPO term at step i alone over the epochs that train i."""

    o, gen = method.options, method.networks["generator"]
    params = [p for p in gen.parameters() if p.requires_grad]

    def flat(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])

    full, per_step = [], {i: [] for i in method.stochastic}
    for r in range(repeats):
        s = step_seed(seed, r)
        ctx = StepContext(step=r, generator=torch_generator(s), seed=s)
        method.before_step(ctx)
        loss, _ = method.loss("generator", ctx)
        full.append(flat(loss))
        for i in method.selected:
            li, _ = method.policy_loss(gen, method.batch, [i])
            per_step[i].append(flat(o.grpo_weight * li))
    return torch.stack(full), {i: torch.stack(v) for i, v in per_step.items() if v}


def variance_stats(g: torch.Tensor) -> dict:
    mean = g.mean(0)
    total = float(((g - mean) ** 2).sum(1).mean())
    signal = float((mean**2).sum())
    return {"total_variance": total, "mean_grad_sq_norm": signal, "relative_variance": total / max(signal, 1e-30)}


def build(backend: str, checkpoint: str, mode: str, overrides: dict):
    method = {"stage": 2, "init": str(checkpoint), "grpo_steps": mode, "bp_weight": 0.0, "dm_weight": 0.0}
    cfg = make_config("rtdmd", backend=backend, overrides=_deep_merge({"method": method, "tracking": {"enabled": False}},
                                                                      overrides))
    b = get_backend(backend).factory(cfg.backend, "cpu")
    return RtdmdMethod(cfg, b)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="toy2d", choices=["toy2d", "shapes"])
    ap.add_argument("--checkpoint", required=True, help="stage-1 (ac-dmd) run or checkpoint: the fixed parameters")
    ap.add_argument("--repeats", type=int, default=64)
    ap.add_argument("--groups", type=int, default=None, help="prompt groups per epoch (default: the config's)")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    over: dict = {"method": {}, "train": {}}
    if args.backend == "toy2d":
        register_reward(REWARD_NAME, mode_reward(make_toy2d(Toy2DOptions())._means), differentiable=True)
        over["method"]["rewards"] = {REWARD_NAME: 1.0}
    if args.group_size:
        over["method"]["group_size"] = args.group_size
    results = {}
    for mode in ("all", "subset"):
        m = build(args.backend, args.checkpoint, mode, over)
        if args.groups:
            m.n_groups = args.groups
            m.cfg.train.batch_size = args.groups * m.options.group_size
        t = time.perf_counter()
        g, per_step = gradient_samples(m, args.repeats)
        results[mode] = {**variance_stats(g), "seconds": time.perf_counter() - t,
                         "batch": m.n_groups * m.options.group_size, "repeats": args.repeats,
                         "per_step": {i: {**variance_stats(v), "epochs": v.shape[0]} for i, v in per_step.items()}}
        r = results[mode]
        name = "GRPO (all steps)" if mode == "all" else "SubGRPO (2 of 3)"
        print(f"{name:18s} update: total variance {r['total_variance']:.4e}  |mean|^2 {r['mean_grad_sq_norm']:.4e}  "
              f"relative {r['relative_variance']:.3f}  ({r['seconds']:.0f} s)")
        for i, v in r["per_step"].items():
            print(f"{'':18s} step {i} alone ({v['epochs']} epochs): total variance {v['total_variance']:.4e}  "
                  f"relative {v['relative_variance']:.3f}")
    a, b = results["all"], results["subset"]
    results["ratio_total_variance"] = b["total_variance"] / a["total_variance"]
    results["ratio_relative_variance"] = b["relative_variance"] / a["relative_variance"]
    results["ratio_per_step_total_variance"] = {i: b["per_step"][i]["total_variance"] / a["per_step"][i]["total_variance"]
                                                for i in a["per_step"] if i in b["per_step"]}
    print(f"SubGRPO / GRPO variance ratio of the update: {results['ratio_total_variance']:.3f} (total), "
          f"{results['ratio_relative_variance']:.3f} (relative)  [{args.backend}, {a['batch']} samples per epoch, "
          f"{args.repeats} epochs]")
    print("SubGRPO / GRPO variance ratio of one trained step's term: " +
          ", ".join(f"step {i} {v:.3f}" for i, v in results["ratio_per_step_total_variance"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
