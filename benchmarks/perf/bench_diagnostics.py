#!/usr/bin/env python
"""What the training diagnostics (train.diagnostics) cost: a logged step with them on against off.

On a logged step (step % train.log_every == 0) the diagnostics add one backward pass per loss term and
micro-batch (the per-term gradient norms and the policy-gradient cosine, docs/rtdmd.md "Diagnostics")
and, in RTDMD stage 2, the oracle beside the learned rewards on the same rollouts. Every other step is
untouched. For each workload (shapes, shipped configs, the Trainer's own step through
benchmarks/perf/method_driver.py): two trainers built from the same config and seed, one stepping with
diagnostics and one without, time the same generator-update step indices (the steps a log point can
fall on); the first generator step of each is a warm-up. With one thread, times are this process's
CPU seconds (the machine may be shared). Printed per workload: CPU-s of a logged step off / on, their
ratio, and the overhead amortised over a log period (train.log_every steps, each at the off cost of
its kind). The last line is `overhead: X.X %` (the largest amortised overhead).

    OMP_NUM_THREADS=1 python benchmarks/perf/bench_diagnostics.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import method_driver as D  # noqa: E402
from bench_cpu_train import stage1_init  # noqa: E402
from rtdmd.api import make_config  # noqa: E402

WORKLOADS = {"ac-dmd": "AC-DMD stage 1 (generator step)", "rtdmd": "RTDMD stage-2 epoch",
             "flow-grpo": "Flow-GRPO iteration"}


def generator_steps(method, n: int) -> list[int]:
    """The first ``n`` step indices on which the generator (or policy) updates."""
    name = "generator" if "generator" in [u.network for u in method.updates] else method.updates[0].network
    out, s = [], 0
    while len(out) < n:
        if name in D.due_updates(method, s):
            out.append(s)
        s += 1
    return out


def timed_steps(method: str, init: Path | None, tmp: Path, diagnose: bool, repeats: int) -> tuple[list[float], dict]:
    """CPU seconds of ``repeats`` generator steps after one warm-up, and the off-cost of every step kind."""
    over = {"train": {"device": "cpu", "num_threads": 1}}
    if method == "rtdmd":
        over["method"] = {"stage": 2, "init": str(init)}
    cfg = make_config(method, backend="shapes", overrides=over)
    tr = D.setup_trainer(cfg, tmp / f"{method}-{'on' if diagnose else 'off'}")
    try:
        steps = generator_steps(tr.method, repeats + 1)
        cpu: list[float] = []
        period = D.update_period(tr.method)
        kinds: dict[tuple[str, ...], float] = {}
        for s in range(steps[-1] + 1):
            c0 = time.process_time()
            tr._one_step(s, diagnose=diagnose and s in steps)
            dt = time.process_time() - c0
            if s in steps[1:]:
                cpu.append(dt)
            elif s > 0 and not diagnose:  # step 0 warms up every kind's first call
                kinds.setdefault(D.due_updates(tr.method, s), dt)
        info = {"log_every": cfg.train.log_every, "period": period, "kinds": kinds,
                "shares": {k: sum(D.due_updates(tr.method, i) == k for i in range(period)) / period
                           for k in {D.due_updates(tr.method, i) for i in range(period)}}}
        return cpu, info
    finally:
        D.release(tr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed generator steps per workload and setting")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    worst = 0.0
    print(f"torch {torch.__version__}, 1 thread, {a.repeats} timed generator steps each; CPU-seconds of this process")
    print(f"| workload | logged step, off (CPU-s) | on (CPU-s) | on / off | log_every | amortised overhead |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        wl = [w for w in a.workloads.split(",") if w]
        init = stage1_init(tmp, 1) if "rtdmd" in wl else None
        for m in wl:
            off, info = timed_steps(m, init, tmp, False, a.repeats)
            on, _ = timed_steps(m, init, tmp, True, a.repeats)
            t_off, t_on = sum(off) / len(off), sum(on) / len(on)
            # a log period of log_every steps, each at the off cost of its kind (generator steps at t_off)
            gen = [k for k in info["shares"] if any(n in k for n in ("generator", "policy"))] or list(info["shares"])
            mean_step = sum(sh * (t_off if k in gen else info["kinds"].get(k, t_off)) for k, sh in info["shares"].items())
            overhead = (t_on - t_off) / (info["log_every"] * mean_step)
            worst = max(worst, overhead)
            print(f"| {WORKLOADS[m]} | {t_off:.2f} | {t_on:.2f} | {t_on / t_off:.2f} | {info['log_every']} | "
                  f"{100 * overhead:+.1f} % |")
    print(f"overhead: {100 * worst:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
