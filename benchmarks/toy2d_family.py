"""The toy2d exact check as a family: random mixtures x two rewards x beta 0 / 1 / 2.

Each mixture (seeded): 3-8 modes, unnormalised weights in [0.1, 0.6], widths in [0.15, 0.4], means in a
disc, every pair separated by at least 3 (s_i + s_j) + 0.6. Rewards: the mode ramp of
benchmarks/toy2d_exact_check.py (r_k = k / (K - 1), softmax over the means, temperature 0.35) and a
linear reward r(x) = a . x (|a| = 0.5, a seeded direction). For each mixture: a flow-matching MLP
(init), stage 1 (AC-DMD, shipped toy2d config, exact teacher), then stage 2 in the exact configuration
(``--preset``, weights rescaled per beta by toy2d_exact_check.exact_overrides) for each reward and beta.
beta = 0 ignores the reward, so one stage-2 run serves both rewards' beta-0 rows.

Target mode weights of p exp(beta r) / Z: for the linear reward in closed form (Gaussian MGF,
``linear_tilted_weights``); for the ramp by importance weighting exact mixture samples
(toy2d_exact_check.exact_tilted_weights; the ramp is nearly, not exactly, constant on a wide mode).
Error: max over modes of |w_generator - w_target|, w_generator from 20,000 4-step samples (nearest mean).

    python -m benchmarks.toy2d_family --out runs/toy2d-family [--cases 5] [--quick] [--preset exact-range]

Prints a markdown table and the line ``cases: N, passed: M (max error <= 0.05), worst: X.XXX``; writes
<out>/results.json and <out>/table.md. A mixture's runs are reused when their checkpoints exist.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.toy2d_exact_check import TAU, _train, exact_overrides, exact_tilted_weights, mode_reward, mode_weights
from rtdmd.api import make_config
from rtdmd.config import _deep_merge, parse_set
from rtdmd.errors import UserError
from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d
from rtdmd.rewards.registry import register_reward

LINEAR_NORM = 0.5  # |a| of the linear reward
TOLERANCE = 0.05
BETAS = (0.0, 1.0, 2.0)
#: --quick: shorter runs and fewer samples (a smoke run of the pipeline, not the measurement); keys as
#: run_mixture's ``budget``: train.max_steps of the init, stage 1 and stage 2, generator samples per estimate
QUICK = {"teacher_steps": 1000, "stage1_steps": 600, "stage2_steps": 300, "samples": 4000}


def random_mixture(seed: int, min_modes: int = 3, max_modes: int = 8) -> dict:
    """A seeded mixture {means, stds, weights} (weights unnormalised in [0.1, 0.6]); every pair of means at
    least 3 (s_i + s_j) + 0.6 apart, inside a disc of radius 2.5 + 0.15 K."""
    g = torch.Generator().manual_seed(10_000 + seed)
    k = int(torch.randint(min_modes, max_modes + 1, (1,), generator=g))
    stds = (0.15 + 0.25 * torch.rand(k, generator=g)).tolist()
    weights = (0.1 + 0.5 * torch.rand(k, generator=g)).tolist()
    radius = 2.5 + 0.15 * k
    for _ in range(100_000):
        means: list[list[float]] = []
        for i in range(k):
            for _ in range(500):
                r, phi = radius * math.sqrt(float(torch.rand(1, generator=g))), 2 * math.pi * float(torch.rand(1, generator=g))
                p = [r * math.cos(phi), r * math.sin(phi)]
                if all(math.dist(p, q) >= 3 * (stds[i] + stds[j]) + 0.6 for j, q in enumerate(means)):
                    means.append(p)
                    break
            else:
                break
        if len(means) == k:
            return {"means": [[round(c, 4) for c in m] for m in means], "stds": [round(s, 4) for s in stds],
                    "weights": [round(w, 4) for w in weights]}
    raise RuntimeError(f"no separated placement of {k} modes found for seed {seed}")


def linear_direction(seed: int, norm: float = LINEAR_NORM) -> list[float]:
    g = torch.Generator().manual_seed(20_000 + seed)
    phi = 2 * math.pi * float(torch.rand(1, generator=g))
    return [norm * math.cos(phi), norm * math.sin(phi)]


def linear_reward(a):
    """r(x) = a . x (differentiable)."""
    av = torch.tensor(a, dtype=torch.float32)

    def reward(x: torch.Tensor, prompts) -> torch.Tensor:
        return x.float() @ av.to(x.device)

    return reward


def linear_tilted_weights(weights, means, stds, a, beta: float) -> torch.Tensor:
    """Mode weights of p exp(beta a.x) / Z for p = sum_j w_j N(m_j, s_j^2 I): w_j exp(beta a.m_j +
    beta^2 |a|^2 s_j^2 / 2), normalised (the Gaussian MGF; the tilted component j is N(m_j + beta s_j^2 a, s_j^2 I))."""
    w = torch.tensor(weights, dtype=torch.float64)
    m = torch.tensor(means, dtype=torch.float64)
    s = torch.tensor(stds, dtype=torch.float64)
    av = torch.tensor(a, dtype=torch.float64)
    logw = torch.log(w) + beta * (m @ av) + 0.5 * beta**2 * float(av @ av) * s**2
    return torch.softmax(logw, dim=0).float()


def ramp_values(k: int) -> list[float]:
    return [i / (k - 1) for i in range(k)]


def run_mixture(seed: int, out: Path, preset: str, betas=BETAS, threads: int = 1, budget: dict | None = None,
                train_seeds=(0,), sets: dict | None = None) -> list[dict]:
    """Init, stage 1, stage 2 per (reward, beta, training seed) for mixture ``seed``: a stage-1 row, then one row per
    (reward, beta, seed). ``budget`` (keys of QUICK, each optional): shorter runs than the shipped configs, fewer
    samples. ``sets``: stage-2 overrides over the preset (a variant: its runs go to their own folder)."""
    budget, sets = budget or {}, sets or {}
    samples = budget.get("samples", 20000)
    mix = random_mixture(seed)
    backend_opts = {**mix, "teacher": "exact"}
    backend = make_toy2d(Toy2DOptions(**backend_opts))
    k = backend.num_modes
    a = linear_direction(seed)
    rewards = {"ramp": (f"toy2d_family_{seed}_ramp", mode_reward(backend._means, ramp_values(k), TAU)),
               "linear": (f"toy2d_family_{seed}_linear", linear_reward(a))}
    for name, fn in rewards.values():
        register_reward(name, fn, differentiable=True)
    base = {"tracking": {"enabled": False}, "train": {"num_threads": threads}, "backend": backend_opts}

    def train(key: str) -> dict:
        return {**base["train"], **({"max_steps": budget[key]} if key in budget else {})}

    init, _ = _train("teacher", out / "init", {**base, "train": train("teacher_steps")})
    s1_train = train("stage1_steps")
    t = time.perf_counter()
    stage1, _ = _train("ac-dmd", out / "stage1", {**base, "train": s1_train, "method": {"init": str(init)}})
    w1, _ = mode_weights(stage1, samples)
    teacher_w = backend._weights
    rows = [{"seed": seed, "modes": k, "reward": "-", "beta": None, "stage": 1, "weights": w1.tolist(),
             "target": teacher_w.tolist(), "max_error": float((w1 - teacher_w).abs().max()),
             "seconds": time.perf_counter() - t}]
    print(f"mixture {seed} ({k} modes), stage 1: max error vs teacher {rows[0]['max_error']:.3f}", flush=True)
    m2 = make_config("rtdmd", backend="toy2d", preset=preset).method
    group_size = m2.group_size
    t_range = {"t0": m2.dm_t_min, "t1": m2.dm_t_max if m2.dm_level_weight == "kl" else None}
    folder = out / (preset + variant_tag(sets))
    for beta in betas:
        for rname, (reg_name, fn) in rewards.items():
            for ts in train_seeds:
                run_dir = folder / ("stage2-beta0" if beta == 0 else f"stage2-{rname}-beta{beta:g}")
                run_dir = run_dir.with_name(run_dir.name + (f"-seed{ts}" if ts else ""))
                over = _deep_merge({**base, "train": {**train("stage2_steps"), "seed": ts},
                                    "method": {"rewards": {reg_name: 1.0}, **exact_overrides(beta, group_size, **t_range)}},
                                   sets)
                t = time.perf_counter()
                ck, _ = _train("rtdmd", run_dir, over, preset=preset, stage="2", init=str(stage1))
                w, _ = mode_weights(ck, samples)
                if rname == "linear":
                    target = linear_tilted_weights(mix["weights"], mix["means"], mix["stds"], a, beta)
                else:
                    target = exact_tilted_weights(backend, fn, beta)
                rows.append({"seed": seed, "modes": k, "reward": rname, "beta": beta, "stage": 2, "train_seed": ts,
                             "weights": w.tolist(), "target": target.tolist(),
                             "max_error": float((w - target).abs().max()), "seconds": time.perf_counter() - t})
                print(f"mixture {seed}, {rname}, beta {beta:g}, training seed {ts}: max error "
                      f"{rows[-1]['max_error']:.3f}", flush=True)
    return rows


def variant_tag(sets: dict) -> str:
    """A folder suffix naming a stage-2 variant by its overrides ("" for the preset as shipped)."""
    if not sets:
        return ""
    return "+" + hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8]


def table(rows: list[dict]) -> str:
    lines = ["| mixture | modes | stage | reward | beta | training seed | max error | generator weights | target weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(f"| {r['seed']} | {r['modes']} | {r['stage']} | {r['reward']} | {beta} | {r.get('train_seed', '-')} | "
                     f"{r['max_error']:.3f} | {_fmt(r['weights'])} | {_fmt(r['target'])} |")
    return "\n".join(lines)


def summary(rows: list[dict], tolerance: float = TOLERANCE) -> str:
    """The stage-2 cases (reward x beta x mixture): how many within ``tolerance``, and the worst error."""
    cases = [r for r in rows if r["stage"] == 2]
    passed = sum(r["max_error"] <= tolerance for r in cases)
    worst = max((r["max_error"] for r in cases), default=float("nan"))
    line = f"cases: {len(cases)}, passed: {passed} (max error <= {tolerance:g}), worst: {worst:.3f}"
    by_case: dict[tuple, list[float]] = {}
    for r in cases:
        by_case.setdefault((r["seed"], r["reward"], r["beta"]), []).append(r["max_error"])
    if any(len(v) > 1 for v in by_case.values()):
        means = [sum(v) / len(v) for v in by_case.values()]
        spread = max(max(v) - min(v) for v in by_case.values())
        line += (f"; over training seeds: {sum(m <= tolerance for m in means)} of {len(means)} cases with mean max error "
                 f"<= {tolerance:g}, worst mean {max(means):.3f}, largest seed-to-seed range {spread:.3f}")
    return line


def _fmt(w) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in w) + "]"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/toy2d-family"))
    ap.add_argument("--cases", type=int, default=5, help="number of mixtures (seeds 0..cases-1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="mixture seeds (instead of --cases)")
    ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    ap.add_argument("--preset", default="exact-range", help="the stage-2 preset (rtdmd@<preset>.yaml): exact or exact-range")
    ap.add_argument("--quick", action="store_true", help="short runs and fewer samples (a smoke run)")
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="stage-2 training seeds per case (0..N-1): separates run-to-run spread from bias")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a stage-2 override over the preset, as rtdmd-bench train --set (a variant: its own folder)")
    return ap


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = parse_set(args.sets)
    make_config("rtdmd", backend="toy2d", preset=args.preset, overrides=sets)  # a bad --set fails before any training
    budget = {**(QUICK if args.quick else {}), "samples": min(args.samples, QUICK["samples"]) if args.quick else args.samples}
    if args.stage2_steps:
        budget["stage2_steps"] = args.stage2_steps
    rows: list[dict] = []
    for seed in args.seeds if args.seeds is not None else range(args.cases):
        rows += run_mixture(seed, args.out / f"mixture{seed}", args.preset, args.betas, args.threads, budget,
                            range(args.train_seeds), sets)
        (args.out / "results.json").write_text(json.dumps({"preset": args.preset, "sets": args.sets, "quick": args.quick,
                                                           "rows": rows}, indent=2) + "\n")
    text = table(rows) + "\n\n" + summary(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return {"rows": rows, "summary": summary(rows)}


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
