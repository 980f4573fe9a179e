"""Choose the shapes teacher's recipe by measurement: train candidates, score GenEval-shapes.

Trains each candidate recipe (a preset of rtdmd/configs/shapes/teacher*.yaml) with the
project's own command, in parallel processes, for at most --minutes each, keeping every
checkpoint; then scores each checkpoint on GenEval-shapes (28 Euler steps, CFG) to give
accuracy against training steps, and the final checkpoints at several guidance weights.
Writes one JSON file of results; optionally bundles the best final checkpoints as a
split tar (for moving them off a lent GPU machine).

    python benchmarks/perf/teacher_recipes.py --recipes default,sd3p2 --minutes 5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.geneval import suite  # noqa: E402
from rtdmd.checkpoint import load_for_inference, read_meta  # noqa: E402
from rtdmd.generate import SamplingConfig  # noqa: E402


def train_all(recipes, args, run_root: Path) -> dict:
    procs = {}
    for r in recipes:
        cmd = [sys.executable, "-m", "rtdmd.cli", "train", "teacher", "--backend", "shapes", "--out", str(run_root / r),
               "--quiet", "--set", f"train.max_minutes={args.minutes}", "--set", "tracking.enabled=false",
               "--set", f"train.device={args.device}", "--set", "train.keep_checkpoints=0",
               "--set", f"train.checkpoint_every={args.checkpoint_every}", "--set", f"train.num_threads={args.threads}"]
        if r != "default":
            cmd += ["--preset", r]
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        log = open(run_root / f"{r}.log", "w")
        procs[r] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)
    status = {}
    for r, (p, log) in procs.items():
        status[r] = p.wait()
        log.close()
    return status


def evaluate(run_dir: Path, guidances, images_per_prompt, args, detector_workers) -> list[dict]:
    rows = []
    steps_dirs = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if ".tmp" not in p.name)
    for i, sd in enumerate(steps_dirs):
        final = i == len(steps_dirs) - 1
        if not final and args.curve_every and int(sd.name.split("_")[1]) % args.curve_every:
            continue
        cfg, backend, net, meta = load_for_inference(sd, device=args.device)
        metadata = suite.default_metadata(backend)
        detector = suite.default_detector(backend)
        for w in (guidances if final else [args.curve_guidance]):
            out = run_dir / "eval" / f"{sd.name}_w{w:g}"
            ipp = args.final_images if final else images_per_prompt
            t0 = time.time()
            sc = SamplingConfig(kind="euler", steps=args.eval_steps, guidance=w)
            suite.generate_images(backend, net, metadata, out, sc, images_per_prompt=ipp, seed=0,
                                  batch_size=args.batch, progress=False)
            tg = time.time() - t0
            _, summary = suite.score_images(out, detector, workers=detector_workers, progress=False)
            rows.append({"recipe": run_dir.name, "checkpoint": sd.name, "step": meta["step"],
                         "train_seconds": meta.get("train_seconds"), "guidance": w, "steps": args.eval_steps,
                         "images_per_prompt": ipp, "final": final, "overall": summary["overall"],
                         "tasks": summary["tasks"], "gen_seconds": round(tg, 1),
                         "params": sum(p.numel() for p in net.parameters())})
            print(json.dumps(rows[-1]), flush=True)
        del net
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bundle(best: list[str], run_root: Path, out_dir: Path, part_mb: int) -> list[str]:
    tar_path = run_root / "best.tar"
    with tarfile.open(tar_path, "w") as tf:
        for r in best:
            sd = sorted(p for p in (run_root / r / "checkpoints").glob("step_*") if ".tmp" not in p.name)[-1]
            for f in ("model.safetensors", "config.yaml", "meta.json"):
                tf.add(sd / f, arcname=f"{r}/{sd.name}/{f}")
    data = tar_path.read_bytes()
    parts = []
    for i in range(0, len(data), part_mb << 20):
        p = out_dir / f"best.tar.part{i // (part_mb << 20)}"
        p.write_bytes(data[i:i + (part_mb << 20)])
        parts.append(p.name)
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="default,sd3p2")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--max-steps", type=int, default=0, help="override every recipe's max_steps (0: the recipe's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--curve-every", type=int, default=1000)
    ap.add_argument("--curve-guidance", type=float, default=4.0)
    ap.add_argument("--guidances", default="2,4,7")
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--final-images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="detector processes")
    ap.add_argument("--run-root", default="runs/recipes")
    ap.add_argument("--out", default="recipes_out", help="folder for results.json and the bundle")
    ap.add_argument("--bundle", type=int, default=0, help="bundle the N best final checkpoints")
    ap.add_argument("--bundle-max-mb", type=int, default=60)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    run_root = (ROOT / args.run_root).resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    status = {} if args.skip_train else train_all(recipes, args, run_root)
    print(f"training done in {time.time() - t0:.0f}s: {status}", flush=True)
    rows = []
    for r in recipes:
        if (run_root / r / "checkpoints" / "latest").is_file():
            rows += evaluate(run_root / r, [float(g) for g in args.guidances.split(",")], args.images_per_prompt,
                             args, args.workers)
    finals = sorted((x for x in rows if x["final"]), key=lambda x: -x["overall"])
    ranked = list(dict.fromkeys(x["recipe"] for x in finals))
    result = {"status": status, "rows": rows, "ranking": ranked, "wall_seconds": round(time.time() - t0, 1),
              "device": args.device}
    if args.bundle and ranked:
        best = ranked[: args.bundle]
        sizes = {r: sum(f.stat().st_size for f in sorted((run_root / r / "checkpoints").glob("step_*"))[-1].glob("*"))
                 for r in best}
        while len(best) > 1 and sum(sizes[r] for r in best) > (args.bundle_max_mb << 20):
            best.pop()
        result["bundle"] = {"recipes": best, "parts": bundle(best, run_root, out_dir, 15)}
    logs = "\n".join(f"===== {r}\n" + (run_root / f"{r}.log").read_text()[-4000:]
                     for r in recipes if (run_root / f"{r}.log").exists())
    (out_dir / "train_logs.txt").write_text(logs)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"ranking": ranked, "bundle": result.get("bundle")}), flush=True)


if __name__ == "__main__":
    main()
