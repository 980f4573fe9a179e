"""MLflow eval runs -> one Markdown report with PNG plots beside it.

    rtdmd-bench report --experiment teacher-steps        # -> reports/teacher-steps/report.md

The table has one row per evaluated configuration (method, checkpoint, sampler, steps,
guidance, eta, seed, images per prompt), with NFE and training cost, one column per
metric, the best value per column in bold and a bootstrap 95% confidence interval over
prompts (from each run's per_prompt.csv artifact). Plots: metric vs NFE, GenEval per
task, sample grids, training curves (when the experiment holds training runs); the
commands and commits that produced the runs close the report.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmarks.eval_models import tracking_uri
from benchmarks.metric_legend import legend
from rtdmd.errors import UserError
from rtdmd.plots import pyplot
from rtdmd.tracking import download_artifact, experiment_names, git_commit, metric_history, portable_text, search_runs

CONFIG_KEYS = ("checkpoint", "method", "backend", "sampler", "steps", "guidance", "eta", "seed", "images_per_prompt")
#: metrics where lower is better (distribution distances); every other metric: higher is better
LOWER_IS_BETTER = ("fd_shapes", "fid")
GENEVAL_TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


# ---------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], strata: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over prompts.

    With ``strata`` (e.g. GenEval task per prompt), prompts are resampled within each
    stratum and the statistic is the unweighted mean of the stratum means -- GenEval's
    overall score (mean of task accuracies), so the interval matches the reported number.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of values")
    rng = np.random.default_rng(seed)
    groups = [v] if strata is None else [v[np.asarray(strata) == s] for s in dict.fromkeys(strata)]
    stat = np.zeros(n_boot)
    for g in groups:
        idx = rng.integers(0, g.size, size=(n_boot, g.size))
        stat += g[idx].mean(axis=1)
    stat /= len(groups)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stat, [a, 1.0 - a])
    return float(lo), float(hi)


def metric_ci(metric: str, per_prompt: pd.DataFrame, n_boot: int, seed: int = 0) -> tuple[float, float] | None:
    """CI of one logged metric from a run's per-prompt table (None where it has no per-prompt form)."""
    if per_prompt is None or per_prompt.empty:
        return None
    if metric == "geneval/overall" and "geneval" in per_prompt:
        return bootstrap_ci(per_prompt["geneval"].to_numpy(), per_prompt["tag"].astype(str).to_numpy(), n_boot, seed)
    if metric.startswith("geneval/") and "geneval" in per_prompt:
        rows = per_prompt[per_prompt["tag"].astype(str) == metric.split("/", 1)[1]]
        return bootstrap_ci(rows["geneval"].to_numpy(), None, n_boot, seed) if len(rows) else None
    if metric in per_prompt:
        return bootstrap_ci(per_prompt[metric].to_numpy(), None, n_boot, seed)
    return None


def best_index(values: Sequence[float], lower_is_better: bool) -> set[int]:
    """Rows holding the best finite value of a column (ties all marked)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    if not np.isfinite(arr).any():
        return set()
    best = np.nanmin(arr) if lower_is_better else np.nanmax(arr)
    return {i for i, v in enumerate(arr) if np.isfinite(v) and np.isclose(v, best, rtol=0, atol=1e-12)}


# ---------------------------------------------------------------------------- MLflow


#: metrics an eval run logs that are not scores (cost and bookkeeping): left out of the tables
NOT_SCORES = ("nfe", "generate_seconds", "score_seconds")


def missing_experiment(experiment: str, uri: str) -> UserError:
    """The error for an experiment the store does not hold, naming the ones it does."""
    names = experiment_names(uri)
    there = f"experiments there: {', '.join(names)}" if names else "it holds no experiments yet"
    return UserError(f"MLflow experiment '{experiment}' does not exist in {uri} ({there}); pass one with --experiment, "
                     "or run 'rtdmd-bench eval --experiment NAME' first.")


def load_runs(experiment: str, uri: str | None = None, kind: str = "eval") -> pd.DataFrame:
    """Finished runs of ``experiment`` tagged kind=<kind>, newest first (pandas, via mlflow.search_runs)."""
    uri = tracking_uri(uri)
    df = search_runs(uri, experiment, f"tags.kind = '{kind}' and attributes.status = 'FINISHED'", must_exist=True)
    if df is None:
        raise missing_experiment(experiment, uri)
    return df


def _download(run_id: str, name: str, dst: Path, uri: str | None) -> Path | None:
    return download_artifact(tracking_uri(uri), run_id, name, dst)


def _param(row, key):
    v = row.get(f"params.{key}")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _tag(run, key) -> str:
    v = run.get(f"tags.{key}")
    return v if isinstance(v, str) else ""


def run_suites(run) -> list[str]:
    """The suites a run holds: its ``suites`` tag (one run per configuration, artifacts under <suite>/), or
    the one ``suite`` of a run of the older one-run-per-suite layout (artifacts at the top)."""
    if _tag(run, "suites"):
        return _tag(run, "suites").split(",")
    return [_tag(run, "suite") or str(_param(run, "suite") or "")]


def _per_prompt_tables(run, uri: str | None, work: Path) -> list[pd.DataFrame]:
    tables = []
    for suite in run_suites(run):
        name = f"{suite}/per_prompt.csv" if _tag(run, "suites") else "per_prompt.csv"
        f = _download(run["run_id"], name, work / run["run_id"], uri)
        if f is not None and f.is_file():
            tables.append(pd.read_csv(f, keep_default_na=False))
    return tables


def _identities(run) -> dict[str, str]:
    """Detector / scorer identities and references of a run (either layout), paths made portable."""
    out = {}
    for c in run.index:
        if isinstance(c, str) and c.startswith("tags.") and c.rsplit(".", 1)[-1] in ("detector", "scorers"):
            if isinstance(run[c], str) and run[c]:
                out[c[len("tags."):]] = portable_text(run[c])
    return out


def collect(df: pd.DataFrame, uri: str | None, n_boot: int, work: Path) -> tuple[list[dict], list[str]]:
    """Group runs into configurations: [{config..., metrics: {m: value}, ci: {m: (lo, hi)}, runs: {suite: run_id}}].
    Runs come newest first; a metric is taken from the newest run of the configuration that holds it."""
    rows: dict[tuple, dict] = {}
    metrics_seen: list[str] = []
    for _, run in df.iterrows():
        key = tuple(_param(run, k) for k in CONFIG_KEYS)
        row = rows.setdefault(key, {**dict(zip(CONFIG_KEYS, key)), "metrics": {}, "ci": {}, "runs": {},
                                    "nfe": None, "train_seconds": None, "tags": {}, "name": _tag(run, "arm") or key[1],
                                    "sha": _tag(run, "checkpoint_sha256")})
        names = [c[len("metrics."):] for c in df.columns if c.startswith("metrics.") and not pd.isna(run[c])
                 and c[len("metrics."):].split("/", 1)[0] not in NOT_SCORES and c[len("metrics."):] not in row["metrics"]]
        fresh = [s for s in run_suites(run) if s not in row["runs"]]
        if not names and not fresh:
            continue  # an older run of a configuration whose metrics newer runs already gave
        for suite in fresh:
            row["runs"][suite] = run["run_id"]
        nfe = _tag(run, "nfe")
        row["nfe"] = row["nfe"] if row["nfe"] is not None or not nfe else int(float(nfe))
        if _tag(run, "train_seconds") and row["train_seconds"] is None:
            row["train_seconds"] = float(_tag(run, "train_seconds"))
        for t, v in [("git_commit", _tag(run, "git_commit")), ("command", _tag(run, "command")),
                     *[("identity", f"{k.split('.', 1)[0]}: {v}" if "." in k else v) for k, v in _identities(run).items()]]:
            if v:
                row["tags"].setdefault(t, set()).add(v)
        tables = _per_prompt_tables(run, uri, work) if names else []
        for m in names:
            row["metrics"][m] = float(run[f"metrics.{m}"])
            ci = next((c for c in (metric_ci(m, t, n_boot) for t in tables) if c is not None), None)
            if ci is not None:
                row["ci"][m] = ci
            if m not in metrics_seen:
                metrics_seen.append(m)
    out = list(rows.values())
    _name_checkpoints(out)
    return out, metrics_seen


def _run_label(checkpoint: str) -> str:
    """'runs/x/rtdmd-no-dm/checkpoints/step_000120' -> 'rtdmd-no-dm@120'; a two-stage run's stage keeps its parent
    ('runs/x/rtdmd/stage1/checkpoints/step_000600' -> 'rtdmd/stage1@600'); a bare checkpoint folder -> its name."""
    p = Path(str(checkpoint).split("@", 1)[0])
    run, step = (p.parent.parent, p.name) if p.parent.name == "checkpoints" else (p, "")
    name = f"{run.parent.name}/{run.name}" if run.name in ("stage1", "stage2") else run.name
    digits = step.rsplit("_", 1)[-1]
    return f"{name}@{int(digits)}" if digits.isdigit() else name


def _name_checkpoints(rows: list[dict]) -> None:
    """Row names: the arm (a study's tag) or the method, plus which run (and step) where one method has several checkpoints; the
    checkpoint's sha prefix where the run labels do not tell them apart."""
    by_method: dict[str, set] = {}
    for r in rows:
        by_method.setdefault(str(r["name"]), set()).add(r["checkpoint"])
    for method, checkpoints in by_method.items():
        if len(checkpoints) < 2:
            continue
        labels = {c: _run_label(c) for c in checkpoints}
        distinct = len(set(labels.values())) == len(labels) and all(labels.values())
        for r in rows:
            if str(r["name"]) == method:
                tail = labels[r["checkpoint"]] if distinct else (r["sha"] or str(abs(hash(r["checkpoint"]))))[:6]
                r["name"] = f"{method} [{tail}]" if distinct else f"{method}@{tail}"


# ---------------------------------------------------------------------------- formatting


def label(row: dict) -> str:
    g = row["guidance"]
    g = f"{float(g):g}" if g is not None else "?"
    return f"{row.get('name', row['method'])} {row['sampler']}-{row['steps']} w{g}"


def _order_metrics(names: list[str]) -> list[str]:
    def rank(m):
        if m == "geneval/overall":
            return (0, 0)
        if m.startswith("geneval/"):
            t = m.split("/", 1)[1]
            return (1, GENEVAL_TASK_ORDER.index(t) if t in GENEVAL_TASK_ORDER else 99)
        if m.startswith("reward/"):
            return (2, m)
        return (3, m)

    return sorted(names, key=rank)


def _fmt(v: float | None, ci=None, bold=False) -> str:
    if v is None:
        return "-"
    digits = 3 if abs(v) < 100 else 1
    s = f"{v:.{digits}f}"
    if bold:
        s = f"**{s}**"
    if ci is not None:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def markdown_table(rows: list[dict], metrics: list[str], ci: bool = True) -> str:
    head = ["method", "sampler", "steps", "CFG", "NFE", "train (min)"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    best = {m: best_index([r["metrics"].get(m) for r in rows], m in LOWER_IS_BETTER) for m in metrics}
    for i, r in enumerate(rows):
        ts = r["train_seconds"]
        cells = [str(r.get("name", r["method"])), str(r["sampler"]), str(r["steps"]), f"{float(r['guidance']):g}",
                 "-" if r["nfe"] is None else str(r["nfe"]), "-" if ts is None else f"{ts / 60:.1f}"]
        for m in metrics:
            cells.append(_fmt(r["metrics"].get(m), r["ci"].get(m) if ci else None, i in best[m]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plot_metric_vs_nfe(rows: list[dict], metrics: list[str], path: Path) -> Path | None:
    metrics = [m for m in metrics if any(r["nfe"] for r in rows if m in r["metrics"])]
    if not metrics:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), dpi=110, squeeze=False)
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r.get("name", r["method"]), r["sampler"], float(r["guidance"]), r["checkpoint"]), []).append(r)
    for ax, m in zip(axes[0], metrics):
        for (method, sampler, g, _), rs in sorted(series.items(), key=lambda kv: kv[0][:3]):
            rs = sorted((r for r in rs if m in r["metrics"] and r["nfe"]), key=lambda r: r["nfe"])
            if not rs:
                continue
            x = [r["nfe"] for r in rs]
            y = [r["metrics"][m] for r in rs]
            err = None
            if all(m in r["ci"] for r in rs):
                err = np.array([[y_ - r["ci"][m][0] for r, y_ in zip(rs, y)], [r["ci"][m][1] - y_ for r, y_ in zip(rs, y)]])
                err = np.clip(err, 0, None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{method} {sampler} w{g:g}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["nfe"] for r in rows if r["nfe"] and m in r["metrics"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE per image")
        ax.set_title(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tasks(rows: list[dict], path: Path) -> Path | None:
    tasks = [t for t in GENEVAL_TASK_ORDER if any(f"geneval/{t}" in r["metrics"] for r in rows)]
    rows = [r for r in rows if any(f"geneval/{t}" in r["metrics"] for t in tasks)]
    if not tasks or not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(10.0, max(6.0, 1.3 * len(tasks) + 0.12 * len(rows) * len(tasks))), 3.6), dpi=110)
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        xs = np.arange(len(tasks)) + (j - (len(rows) - 1) / 2) * width
        ys = [r["metrics"].get(f"geneval/{t}", np.nan) for t in tasks]
        ax.bar(xs, ys, width, label=label(r))
    ax.set_xticks(np.arange(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(experiment: str, uri: str | None, path: Path) -> Path | None:
    """Loss curves of the experiment's training runs (kind=train), if any."""
    try:
        df = load_runs(experiment, uri, kind="train")
    except UserError:
        return None
    if df.empty:
        return None
    curves = []
    for _, run in df.iterrows():
        for c in df.columns:
            if c.startswith("metrics.loss/") and not pd.isna(run[c]):
                pts = metric_history(tracking_uri(uri), run["run_id"], c[len("metrics."):])
                if len(pts) > 1:
                    curves.append((f"{run.get('tags.method')} {c[len('metrics.'):]}", pts))
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, pts in curves:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------- the report


def write_report(experiment: str, out: Path | None = None, uri: str | None = None, n_boot: int = 1000,
                 command: str = "") -> Path:
    """Write the Markdown report of ``experiment`` and its PNGs; returns the Markdown path."""
    df = load_runs(experiment, uri)
    if df.empty:
        raise UserError(f"MLflow experiment '{experiment}' holds no finished eval runs; run 'rtdmd-bench eval --experiment "
                        f"{experiment}' first.")
    out = Path(out) if out is not None else Path("reports") / _slug(experiment) / "report.md"
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rtdmd-report-"))
    try:
        rows, metrics = collect(df, uri, n_boot, work)
        rows.sort(key=lambda r: (str(r["name"]), float(r["guidance"]), r["nfe"] or 0, str(r["seed"])))
        metrics = _order_metrics(metrics)
        main = [m for m in metrics if not (m.startswith("geneval/") and m != "geneval/overall")]
        tasks = [m for m in metrics if m.startswith("geneval/") and m != "geneval/overall"]
        md = [f"# Evaluation report: {experiment}", ""]
        md.append(f"{_count(len(df), 'eval run')}, {_count(len(rows), 'configuration')}. Values are means over images; brackets give a "
                  f"bootstrap 95% confidence interval over prompts ({n_boot} resamples; GenEval overall resamples within "
                  "each task). Best per column in bold (highest, except FD/FID: lowest). NFE = network evaluations per "
                  "image (steps, x2 with CFG). Training cost: the checkpoint's train_seconds in minutes (- where unknown).")
        md += ["", "## Results", "", markdown_table(rows, main), ""]
        if tasks:
            md += ["## GenEval per task", "", markdown_table(rows, tasks), ""]
        md += legend(metrics)
        md += _plots_section(rows, metrics, folder, experiment, uri, work)
        md += _provenance(df, rows, command, git_commit())
        out.write_text("\n".join(md) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _plots_section(rows, metrics, folder: Path, experiment: str, uri, work: Path) -> list[str]:
    md = ["## Plots", ""]
    main = [m for m in metrics if not (m.startswith("geneval/") and m != "geneval/overall")]
    p = plot_metric_vs_nfe(rows, main, folder / "metric_vs_nfe.png")
    if p:
        md += ["Metric against NFE (error bars: 95% CI over prompts).", "", f"![metric vs NFE]({p.name})", ""]
    p = plot_tasks(rows, folder / "geneval_tasks.png")
    if p:
        md += ["GenEval accuracy per task.", "", f"![GenEval per task]({p.name})", ""]
    p = plot_training(experiment, uri, folder / "training_curves.png")
    if p:
        md += ["Training losses of the experiment's training runs.", "", f"![training curves]({p.name})", ""]
    grids = []
    for r in rows:
        run_id = r["runs"].get("geneval") or next(iter(r["runs"].values()), None)
        if run_id is None:
            continue
        g = _download(run_id, "grid.png", work / f"grid-{run_id}", uri)
        if g is None:
            continue
        name = f"grid_{_slug(label(r))}_seed{r['seed']}.png"
        shutil.copyfile(g, folder / name)
        prompts = _download(run_id, "grid_prompts.txt", work / f"grid-{run_id}", uri)
        rows_text = " / ".join(prompts.read_text().splitlines()) if prompts is not None else ""
        grids.append((label(r), r["seed"], name, rows_text))
    if grids:
        md += ["### Sample grids", "", "One row per prompt, one column per image (each image has its own seed)."]
        shared = len({g[3] for g in grids}) == 1 and grids[0][3]
        if shared:
            md += [f"Rows (every grid): {grids[0][3]}."]
        md += [""]
        for lab, seed, name, rows_text in grids:
            caption = "" if shared or not rows_text else f"; rows: {rows_text}"
            md += [f"**{lab}** (seed {seed}{caption})", "", f"![{lab}]({name})", ""]
    return md


def _provenance(df: pd.DataFrame, rows: list[dict], command: str, commit: str) -> list[str]:
    cmds = list(dict.fromkeys(portable_text(c) for c in df.get("tags.command", pd.Series(dtype=str)).dropna() if c))
    commits = sorted({c for c in df.get("tags.git_commit", pd.Series(dtype=str)).dropna() if c})
    md = ["## How this was made", "", "Eval commands (one per line, as run; a path is shown relative to the working "
          "directory, or by its last component when outside it):", "", "```"]
    md += list(reversed(cmds)) or ["(not recorded)"]
    md += ["```", "", f"Eval code commit(s): {', '.join(commits) or 'unknown'}.", ""]
    ident = sorted({v for r in rows for v in r["tags"].get("identity", ())})
    if ident:
        md += ["Detector / scorer identities: " + "; ".join(ident) + ".", ""]
    md += ["Report:", "", "```", command or "rtdmd-bench report", "```", "", f"Report code commit: {commit}.", ""]
    return md
