"""toy2d exact check of RTDMD: does stage 2 land on the reward-tilted teacher p(x) exp(beta r(x)) / Z?

The teacher is the exact 8-mode Gaussian mixture (backend toy2d, teacher: exact). The reward is
(nearly) constant on each mode, r(x) = sum_k r_k softmax_k(-|x - mu_k|^2 / (2 tau^2)), so the tilted
target keeps the teacher's mode shapes and re-weights the modes: w~_k = w_k E_k[exp(beta r)] / Z
(computed here by Monte Carlo over exact mixture samples, 400k of them: error ~1e-3).

Steps (docs/rtdmd.md, "Exact check", has the derivation of the configuration):
1. a flow-matching MLP on the mixture (`train teacher`): the init of the generator and fake score;
2. stage 1 (AC-DMD, shipped toy2d config) from that init: MMD to the teacher's samples;
3. stage 2 in the exact configuration (rtdmd@exact preset, weights rescaled per beta) for each beta:
   generator mode weights vs the exact tilted weights (target: max error <= 0.05);
4. stage 2 in the paper's configuration (the shipped toy2d rtdmd.yaml: normalised DMD gradient,
   standardised advantages, simplified log-prob, hinge, weights 1 / 1e-4 / 1e-3): where it lands,
   and the beta whose tilted weights it matches best.

    python benchmarks/toy2d_exact_check.py --out runs/toy2d-exact [--betas 0 1 2] [--stage2-steps N]

Prints a table and writes <out>/results.json. About 10-15 minutes on 2 CPU cores (run it through
the CPU lock: flock /tmp/rtdmd-cpu.lock python benchmarks/toy2d_exact_check.py ...).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from benchmarks.toy2d_metrics import matches_teacher
from rtdmd import checkpoint as ckpt
from rtdmd.api import make_config, run_training
from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d
from rtdmd.checkpoint import load_for_inference
from rtdmd.generate import SamplingConfig, generate
from rtdmd.rewards.registry import register_reward

#: per-mode reward values r_k (mode k at angle 2 pi k / 8): a monotone ramp from 0 to 1
MODE_REWARDS = [k / 7 for k in range(8)]
TAU = 0.35  # softmax temperature of the reward: ~constant on a mode (std 0.25), smooth between modes
T0 = 0.1  # the DM term's fixed noise level in the exact configuration
REWARD_NAME = "toy2d_mode_ramp"


def mode_reward(means: torch.Tensor, values=MODE_REWARDS, tau: float = TAU):
    """The user-written reward: r(x) = sum_k r_k softmax_k(-|x - mu_k|^2 / (2 tau^2)), differentiable."""
    vals = torch.tensor(values, dtype=torch.float32)

    def reward(x: torch.Tensor, prompts) -> torch.Tensor:
        logits = -torch.cdist(x.float(), means.to(x.device)) ** 2 / (2 * tau**2)
        return (torch.softmax(logits, dim=1) * vals.to(x.device)).sum(dim=1)

    return reward


def exact_tilted_weights(backend, reward, beta: float, n: int = 400_000, seed: int = 123) -> torch.Tensor:
    """Mode weights of p(x) exp(beta r(x)) / Z (nearest-mode assignment), by importance weighting exact
    mixture samples."""
    x, _ = backend.sample_mixture(n, torch.Generator().manual_seed(seed))
    w = torch.exp(beta * reward(x, None).double())
    k = backend.mode_of(x)
    out = torch.zeros(backend.num_modes, dtype=torch.float64).index_add_(0, k, w)
    return (out / out.sum()).float()


def exact_overrides(beta: float, group_size: int, t0: float = T0, dim: int = 2, n_stochastic: int = 3,
                    t1: float | None = None) -> dict:
    """Stage-2 weights whose fixed point is the tilted target (docs/rtdmd.md): the DM gradient at fixed t0 with
    no normalisation is t0^2 / ((1 - t0)^2 dim) grad KL_t0, so dm_weight = dim (1 - t0)^2 / t0^2 makes it
    grad KL_t0; raw group-centred advantages with Gaussian log-probs, averaged over the trained steps, give
    (1 - 1/K) / n_stochastic of the stochastic steps' share of grad E[r], so grpo_weight = beta n_stochastic / (1 - 1/K);
    the linear hinge (margin above max r) gives -bp_weight grad r through the last step, so bp_weight = beta.
    With ``t1`` the DM term covers a range of levels instead: t ~ U[t0, t1], each row scaled to grad KL_t
    (dm_level_weight: kl, dm_weight 1; docs/toy2d-family.md)."""
    if t1 is None:
        dm = {"dm_weight": dim * (1 - t0) ** 2 / t0**2, "dm_t_min": t0, "dm_t_max": t0}
    else:
        dm = {"dm_weight": 1.0, "dm_t_min": t0, "dm_t_max": t1, "dm_t_draw": "uniform", "dm_level_weight": "kl"}
    return {**dm, "normalize": False,
            "dm_grad": "all", "advantage_normalize": False, "advantage_clip": 1.0e6, "log_prob": "gaussian",
            "grpo_weight": beta * n_stochastic / (1 - 1 / group_size), "bp_weight": beta, "bp_margin": 1.0e3}


def mode_weights(checkpoint, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mode weights of the checkpoint's generator, its samples) at its own 4-step sampler."""
    _, b, net, meta = load_for_inference(checkpoint)
    x = generate(b, net, [""] * n, [(7, "exact", i) for i in range(n)], SamplingConfig.from_meta(meta["sampler"]))
    return torch.bincount(b.mode_of(x), minlength=b.num_modes).float() / n, x


def _finished(out: Path) -> bool:
    """Whether the run in ``out`` reached its configured train.max_steps (an interrupted run has not)."""
    latest, config = out / "checkpoints" / "latest", out / "config.yaml"
    if not (latest.is_file() and config.is_file()):
        return False
    step = int(latest.read_text().strip().rpartition("_")[2] or -1)
    return step >= int((yaml.safe_load(config.read_text()) or {}).get("train", {}).get("max_steps", 0))


def _train(method, out: Path, overrides: dict, preset=None, stage=None, init=None):
    """Train into ``out`` (a finished run there is reused, an interrupted one continued); (checkpoint, seconds)."""
    if _finished(out):
        return ckpt.find_checkpoint(out), 0.0
    t = time.perf_counter()
    r = run_training(method, backend="toy2d", overrides=overrides, preset=preset, stage=stage, init=init, out=out,
                     resume="auto", show_progress=False)
    return r.checkpoint, time.perf_counter() - t


def fit_beta(weights: torch.Tensor, teacher: torch.Tensor, rewards) -> float:
    """The beta of the tilted family w_k exp(beta r_k) / Z closest (least squares in log weight) to ``weights``."""
    r = torch.tensor(rewards, dtype=torch.float64)
    y = torch.log(weights.double().clamp(min=1e-4)) - torch.log(teacher.double())
    rc, yc = r - r.mean(), y - y.mean()
    return float((rc * yc).sum() / (rc * rc).sum())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/toy2d-exact"))
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--stage2-steps", type=int, default=None, help="override stage 2's train.max_steps")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    backend = make_toy2d(Toy2DOptions())
    reward = mode_reward(backend._means)
    register_reward(REWARD_NAME, reward, differentiable=True)
    quiet = {"tracking": {"enabled": False}, "train": {"num_threads": args.threads}}
    results: dict = {"mode_rewards": MODE_REWARDS, "tau": TAU, "t0": T0}

    init, s = _train("teacher", out / "init", quiet)
    results["init_seconds"] = s
    stage1, s = _train("ac-dmd", out / "stage1", {**quiet, "method": {"init": str(init)}})
    w1, x1 = mode_weights(stage1, args.samples)
    n = 2000
    ta, _ = backend.sample_mixture(n, torch.Generator().manual_seed(1))
    tb, _ = backend.sample_mixture(n, torch.Generator().manual_seed(2))
    ok, m, ref = matches_teacher(x1[:n], ta, tb)
    teacher_w = torch.tensor(backend.options.weights) / sum(backend.options.weights)
    results["stage1"] = {"mmd": m, "mmd_floor": ref, "matches_teacher": ok, "seconds": s, "mode_weights": w1.tolist(),
                         "max_weight_error_vs_teacher": float((w1 - teacher_w).abs().max())}
    print(f"stage 1 (AC-DMD): MMD {m:.4f} vs teacher floor {ref:.4f} (ratio {m / ref:.2f}, matches: {ok}); "
          f"max |w - w_teacher| = {results['stage1']['max_weight_error_vs_teacher']:.3f}")

    stage2_train = {"max_steps": args.stage2_steps} if args.stage2_steps else {}
    group_size = make_config("rtdmd", backend="toy2d", preset="exact").method.group_size
    results["exact"] = {}
    for beta in args.betas:
        over = {**quiet, "train": {**quiet["train"], **stage2_train},
                "method": {"rewards": {REWARD_NAME: 1.0}, **exact_overrides(beta, group_size)}}
        ck, s = _train("rtdmd", out / f"exact-beta{beta:g}", over, preset="exact", stage="2", init=str(stage1))
        w, _ = mode_weights(ck, args.samples)
        target = exact_tilted_weights(backend, reward, beta)
        err = float((w - target).abs().max())
        results["exact"][f"{beta:g}"] = {"mode_weights": w.tolist(), "tilted_weights": target.tolist(),
                                        "max_error": err, "within_0.05": err <= 0.05, "seconds": s}
        print(f"exact config, beta={beta:g}: max |w - w_tilted| = {err:.3f}  weights {_fmt(w)}  target {_fmt(target)}")

    over = {**quiet, "train": {**quiet["train"], **stage2_train}, "method": {"rewards": {REWARD_NAME: 1.0}}}
    ck, s = _train("rtdmd", out / "paper", over, stage="2", init=str(stage1))
    w, _ = mode_weights(ck, args.samples)
    beta_fit = fit_beta(w, teacher_w, MODE_REWARDS)
    closest = exact_tilted_weights(backend, reward, beta_fit)
    results["paper"] = {"mode_weights": w.tolist(), "fitted_beta": beta_fit, "seconds": s,
                        "tilted_at_fitted_beta": closest.tolist(),
                        "max_error_at_fitted_beta": float((w - closest).abs().max()),
                        "mean_reward_weight": float((w * torch.tensor(MODE_REWARDS)).sum())}
    for beta in args.betas:
        target = exact_tilted_weights(backend, reward, beta)
        results["paper"][f"max_error_vs_beta{beta:g}"] = float((w - target).abs().max())
    print(f"paper config: weights {_fmt(w)}; closest tilted family member beta = {beta_fit:.2f} "
          f"(max error there {results['paper']['max_error_at_fitted_beta']:.3f})")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _fmt(w: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in w.tolist()) + "]"


if __name__ == "__main__":
    main()
