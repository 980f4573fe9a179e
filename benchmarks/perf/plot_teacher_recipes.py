"""Plot GenEval-shapes accuracy against training steps for the teacher recipes measured by
benchmarks/perf/teacher_recipes.py (results JSON files), with a CPU-time axis from measured
seconds per step on 2 CPU cores (benchmarks/perf/bench_teacher.py).

    python benchmarks/perf/plot_teacher_recipes.py reports/teacher_recipes/*.json \
        --cpu-seconds default=1.61,unet2=2.2 --out reports/teacher_recipes/curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--cpu-seconds", default="", help="recipe=seconds per step on 2 CPU cores, comma separated")
    ap.add_argument("--out", default="reports/teacher_recipes/curve.png")
    args = ap.parse_args()
    cpu = {k: float(v) for k, v in (kv.split("=") for kv in args.cpu_seconds.split(",") if kv)}
    points: dict[str, dict[int, float]] = {}
    for path in args.results:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["guidance"] == args.guidance:
                points.setdefault(row["recipe"], {})[row["step"]] = row["overall"]  # later files win
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for recipe, pts in sorted(points.items()):
        steps = sorted(pts)
        if recipe in cpu:
            xs, label = [s * cpu[recipe] / 3600 for s in steps], f"{recipe} ({cpu[recipe]:.2f} s/step on CPU)"
        else:
            continue
        ax.plot(xs, [pts[s] for s in steps], marker="o", label=label)
        print(recipe, [(s, round(pts[s], 3)) for s in steps])
    ax.axhline(0.4, color="grey", ls=":", lw=1)
    ax.set_xlabel("training time on 2 CPU cores (hours, from measured s/step)")
    ax.set_ylabel(f"GenEval-shapes overall (28 steps, CFG {args.guidance:g})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
