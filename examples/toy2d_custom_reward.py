"""RTDMD on toy2d with a reward written in this file (docs/api.md walks through it).

The toy2d world: 2-D points from an 8-mode Gaussian mixture (the exact teacher). The reward below
prefers the right half-plane. Stage 1 (AC-DMD) distils a 4-step generator; stage 2 (RTDMD) tilts it
toward the reward while the DM term keeps it close to the teacher. Prints the share of points with
x > 0 and the mean reward for the teacher, after stage 1 and after stage 2.

    python examples/toy2d_custom_reward.py             # ~3 minutes on 2 CPU cores
    python examples/toy2d_custom_reward.py --quick     # seconds: a smoke run (tests/test_api_example.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rtdmd.api import make_config, run_training, sample
from rtdmd.rewards.registry import register_reward


def right_half(points: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """toy2d "images" are the points themselves, (B, 2); return one score per point, (B,)."""
    return torch.sigmoid(2.0 * points[:, 0])


def main(out: Path = Path("runs/example-toy2d"), quick: bool = False) -> dict:
    register_reward("right_half", right_half, differentiable=True)  # differentiable: usable for back-propagation
    small = {"backend": {"hidden": 16, "depth": 2}} if quick else {}
    no_mlflow = {"tracking": {"enabled": False}, "train": {"num_threads": 1}}

    # 1. the generator and fake score start from a flow-matching MLP of the mixture (toy2d's "teacher weights")
    init = run_training("teacher", backend="toy2d", out=out / "init", show_progress=False,
                        overrides={**small, **no_mlflow, "train": {"num_threads": 1, "max_steps": 20 if quick else 2000}})

    # 2. both RTDMD stages: shipped toy2d config, our reward, shorter runs
    cfg = make_config("rtdmd", backend="toy2d", overrides={
        **small, **no_mlflow,
        "method": {"rewards": {"right_half": 1.0},  # name -> weight in the group advantage
                   "bp_margin": 1.5,                  # hinge margin above this reward's range (0..1)
                   "stage1": {"init": str(init.checkpoint)},
                   "stage1_train": {"max_steps": 10 if quick else 1500}},
        "train": {"num_threads": 1, "max_steps": 5 if quick else 300},
    })
    result = run_training(cfg, out=out / "rtdmd", show_progress=False)

    # 3. measure: teacher (exact mixture), stage 1, stage 2
    n = 64 if quick else 4000
    from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d

    teacher_points, _ = make_toy2d(Toy2DOptions()).sample_mixture(n, torch.Generator().manual_seed(0))
    report = {}
    for name, pts in (("teacher", teacher_points), ("stage 1 (AC-DMD)", sample(out / "rtdmd" / "stage1", [""] * n)),
                      ("stage 2 (RTDMD)", sample(result.checkpoint, [""] * n))):
        report[name] = {"share_x_positive": float((pts[:, 0] > 0).float().mean()),
                        "mean_reward": float(right_half(pts, [""] * n).mean())}
        print(f"{name:18s} share x>0 {report[name]['share_x_positive']:.3f}   mean reward {report[name]['mean_reward']:.3f}")
    print(f"checkpoint: {result.checkpoint}")
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example-toy2d"))
    ap.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke run)")
    a = ap.parse_args()
    main(a.out, a.quick)
