"""Eval speed: one few-step shapes checkpoint on GenEval-shapes, end to end, against the 2-minute target.

    python benchmarks/perf/bench_eval.py [--checkpoint PATH] [--steps 4]

Runs ``benchmarks.runner.run_eval`` exactly as ``rtdmd-bench eval --suite geneval`` does
(default prompt count: 209 prompts x 4 images, batched per-sample-seeded generation, the
shapes detector, MLflow logging to a temporary sqlite store) into a fresh folder, and
prints the time of each phase and total / 120 s (target: <= 1.0 on 2 cores). Then it
rescores the same images with --images at each detector worker count, to show what the
worker processes buy. Default checkpoint: the shipped teacher sampled with 4 Euler steps
and no CFG -- the network and NFE of a 4-step distilled student.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 120.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "rtdmd" / "assets" / "shapes_teacher"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--max-prompts", type=int, default=None, help="default: all (209 for GenEval-shapes)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workers", default="auto", help="detector processes for the timed run: auto or N")
    ap.add_argument("--rescore-workers", default="0,2", help="worker counts to compare when rescoring")
    args = ap.parse_args()

    t_import = time.perf_counter()
    from benchmarks import runner  # imported here: the import time is one of the figures measured

    t_import = time.perf_counter() - t_import
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    workers = None if args.workers == "auto" else int(args.workers)
    opts = runner.EvalOptions(suites=["geneval"], steps=args.steps, guidance=args.guidance,
                              images_per_prompt=args.images_per_prompt, max_prompts=args.max_prompts,
                              out=work / "eval", experiment="bench-eval", tracking_uri=uri, batch_size=args.batch_size,
                              workers=workers, threads=args.threads, progress=False, command="bench_eval.py")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, torch threads "
          f"{args.threads or 'default'}, work dir {work}", flush=True)
    t0 = time.perf_counter()
    (res,) = runner.run_eval([args.checkpoint], opts)
    total = time.perf_counter() - t0
    n = res.generated
    s = res.seconds
    print(f"images generated: {n} ({args.steps} steps, guidance {args.guidance:g}, NFE {runner.nfe(args.steps, args.guidance)})")
    print(f"generate (incl. model load): {s['generate']:.1f} s  ({n / max(s['generate'], 1e-9):.1f} img/s)")
    print(f"score (detector + rules):    {s['score']:.1f} s  ({n / max(s['score'], 1e-9):.1f} img/s)")
    print(f"artifacts + MLflow:          {s['log']:.1f} s")
    print(f"total run_eval:              {total:.1f} s  (+ {t_import:.1f} s imports)")
    print(f"GenEval-shapes overall {res.metrics['geneval/overall']:.3f}")
    print(f"ratio total / target ({TARGET_SECONDS:.0f} s): {(total + t_import) / TARGET_SECONDS:.2f}  "
          f"({'meets' if total + t_import <= TARGET_SECONDS else 'misses'} the target)", flush=True)
    for w in [int(x) for x in args.rescore_workers.split(",") if x.strip()]:
        o = runner.EvalOptions(suites=["geneval"], steps=args.steps, guidance=args.guidance,
                               images_per_prompt=args.images_per_prompt, max_prompts=args.max_prompts,
                               images_dir=res.image_dir, tracking=False, workers=w, progress=False,
                               out=work / "unused")
        (r,) = runner.run_eval([args.checkpoint], o)
        assert r.metrics == res.metrics, "rescoring the same images must give the same scores"
        print(f"rescore with {w} detector workers: {r.seconds['score']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
