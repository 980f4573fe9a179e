"""Claim (b) measured directly: how well does the fake score follow a frozen generator after a few updates,
under AC-DMD's objective and under DMD2's?

World: toy2d (the 8-mode mixture). Frozen generator: a flow-matching MLP of the mixture (``train teacher``,
``--teacher-steps``, into <out>/init), used as the teacher network and run as the 4-step CPS generator (eta 0.9, AC-DMD's sampler), so its samples differ from the teacher's. Both fake
scores start from the same weights (the teacher's, as in training) and take the same number of updates on
samples of that frozen generator, each through its method's own code path (``AcDmdMethod.before_step`` and
``loss("fake_score")``): AC-DMD's ambient DSM + consistency on the noisy state x_s of a random stop index k,
DMD2's plain flow matching on the x0 prediction of its backward simulation (objective: dmd2).

Reference: a fake score trained to convergence (plain flow matching, t ~ U(0, 1), cosine lr) on final
samples of the frozen generator. Tracking error of a fake score, per stop index k: its excess flow-matching
loss over the reference's, on fresh final generator samples x0 (s = 0), with t drawn as the DM term at stop
k draws it (t ~ U[s_k + 0.01, 1] clamped to [0.02, 0.98]), the same draws for every network:

    excess_k = E[|v_phi(x_t, t) - (n - x0)|^2] - E[|v_ref(x_t, t) - (n - x0)|^2]

(= E|v_phi - v_G|^2 - E|v_ref - v_G|^2, v_G the generator's exact velocity). Repeated over seeds; 95%
bootstrap CIs over seeds of each mean and of the paired difference AC-DMD - DMD2.

    python -m benchmarks.fake_score_tracking --out runs/fake-tracking [--seeds 5] [--updates 25 100 400]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.study.stats import mean_interval, paired_difference
from benchmarks.toy2d_exact_check import _train
from rtdmd import objectives, samplers
from rtdmd.api import make_config
from rtdmd.methods.base import StepContext
from rtdmd.registry import get_backend, get_method

OBJECTIVES = ("ac-dmd", "dmd2")


def _method(objective: str, batch: int, teacher: str):
    cfg = make_config("ac-dmd", backend="toy2d", overrides={
        "backend": {"teacher": teacher}, "method": {"objective": objective, "init": teacher},
        "train": {"batch_size": batch, "num_threads": 1}, "tracking": {"enabled": False}})
    backend = get_backend("toy2d").factory(cfg.backend, "cpu")
    return cfg, backend, get_method("ac-dmd").factory(cfg, backend)


def generator_samples(backend, gen, n: int, g: torch.Generator) -> torch.Tensor:
    """Final samples of the frozen 4-step CPS generator (eta 0.9)."""
    cond = backend.encode_prompts([""] * n)
    x1 = torch.randn(n, 2, generator=g)
    noises = [torch.randn(n, 2, generator=g) for _ in range(4)]
    with torch.no_grad():
        r = samplers.cps_rollout(lambda x, s: backend.velocity(gen, x, s, cond), x1, backend.generator_sigmas(), 0.9,
                                 noises=noises, num_steps=4, grad_steps=set())
    return r.final


def train_reference(backend, gen, fake, steps: int, batch: int, lr: float, seed: int = 999) -> None:
    """Plain flow matching on fresh final generator samples, t ~ U(0, 1), cosine-decayed lr: to convergence."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(fake.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    cond = backend.encode_prompts([""] * batch)
    for _ in range(steps):
        x0 = generator_samples(backend, gen, batch, g)
        t, n = torch.rand(batch, generator=g), torch.randn(batch, 2, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * n
        loss = ((backend.velocity(fake, x_t, t, cond) - (n - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def eval_set(backend, gen, n: int, seed: int = 4242) -> dict:
    """Fresh final samples, noise and per-k levels t (the DM term's draw at stop k), shared by every network."""
    g = torch.Generator().manual_seed(seed)
    x0 = generator_samples(backend, gen, n, g)
    noise = torch.randn(n, 2, generator=g)
    sig = backend.generator_sigmas()
    ts = {k: objectives.sample_subinterval_t(torch.full((n,), float(sig[k])), g, lo=0.02, hi=0.98) for k in range(1, 5)}
    return {"x0": x0, "noise": noise, "t": ts, "cond": backend.encode_prompts([""] * n)}


def fm_losses(backend, net, ev: dict) -> dict[int, float]:
    out = {}
    with torch.no_grad():
        for k, t in ev["t"].items():
            x_t = (1 - t[:, None]) * ev["x0"] + t[:, None] * ev["noise"]
            out[k] = float(((backend.velocity(net, x_t, t, ev["cond"]) - (ev["noise"] - ev["x0"])) ** 2).sum(1).mean())
    return out


def track(objective: str, seed: int, updates: list[int], batch: int, ev: dict, ref_loss: dict,
          teacher: str) -> dict[int, dict]:
    """One fake score trained by ``objective`` on the frozen generator; its excess loss per k after each count."""
    cfg, backend, method = _method(objective, batch, teacher)
    fake = method.networks["fake_score"]
    opt = torch.optim.Adam(fake.parameters(), lr=cfg.method.fake_optim.lr)
    out = {}
    for i in range(max(updates)):
        ctx = StepContext(step=i, generator=torch.Generator().manual_seed(1_000_003 * (seed + 1) + i), seed=seed * 100_000 + i)
        method.before_step(ctx)
        loss, _ = method.loss("fake_score", ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i + 1 in updates:
            losses = fm_losses(backend, fake, ev)
            out[i + 1] = {k: losses[k] - ref_loss[k] for k in losses}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/fake-tracking"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--updates", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reference-steps", type=int, default=3000)
    ap.add_argument("--eval-samples", type=int, default=50_000)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    init, _ = _train("teacher", args.out / "init", {"tracking": {"enabled": False},
                                                    "train": {"num_threads": 1, "max_steps": args.teacher_steps}})
    teacher = str(init)
    cfg, backend, method = _method("ac-dmd", args.batch, teacher)
    gen, ref = method.networks["generator"].eval(), method.networks["fake_score"]
    ev = eval_set(backend, gen, args.eval_samples)
    init_excess = fm_losses(backend, ref, ev)  # the shared init, before the reference trains
    train_reference(backend, gen, ref, args.reference_steps, args.batch, cfg.method.fake_optim.lr)
    ref_loss = fm_losses(backend, ref, ev)
    init_excess = {k: init_excess[k] - ref_loss[k] for k in ref_loss}
    runs = {o: [track(o, s, args.updates, args.batch, ev, ref_loss, teacher) for s in range(args.seeds)] for o in OBJECTIVES}
    lines = ["| updates | k | AC-DMD excess (95% CI) | DMD2 excess (95% CI) | AC-DMD - DMD2 (95% CI) |", "|---|---|---|---|---|"]
    rows = []
    for u in args.updates:
        for k in range(1, 5):
            a = [r[u][k] for r in runs["ac-dmd"]]
            d = [r[u][k] for r in runs["dmd2"]]
            ca, cd = mean_interval([a], n_boot=4000), mean_interval([d], n_boot=4000)
            diff = paired_difference([a], [d], n_boot=4000)  # seeds paired: the same init and generator per seed
            cdiff = (diff.diff, diff.lo, diff.hi)
            rows.append({"updates": u, "k": k, "ac_dmd": ca, "dmd2": cd, "difference": cdiff})
            lines.append(f"| {u} | {k} | {_ci(ca)} | {_ci(cd)} | {_ci(cdiff)} |")
    init_line = "excess of the shared init (the MLP's weights): " + ", ".join(f"k={k}: {v:.4f}" for k, v in init_excess.items())
    text = "\n".join(lines) + "\n\n" + init_line
    print(text)
    res = {"seeds": args.seeds, "batch": args.batch, "reference_steps": args.reference_steps,
           "reference_loss": ref_loss, "init_excess": init_excess, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "table.md").write_text(text + "\n")
    return res


def _ci(c: tuple[float, float, float]) -> str:
    return f"{c[0]:.4f} ({c[1]:.4f}, {c[2]:.4f})"


if __name__ == "__main__":
    main()
