"""Check that the MLflow UI compares an experiment's evaluations as a method-by-metric table, and screenshot it.

    python benchmarks/perf/check_mlflow_ui.py [--experiment NAME] \
        [--tracking-uri sqlite:///mlflow.db] [--out reports/<experiment>/mlflow_compare.png]

Starts ``mlflow ui --backend-store-uri <uri>`` on a free local port (one worker) and asks its REST
API for the experiment's finished eval runs, then checks what a person comparing them in the UI
needs: the runs are exactly those ``mlflow.search_runs`` returns (what ``rtdmd-bench report``
reads); one run per configuration (checkpoint, sampler, steps, CFG, eta, seed, images per prompt,
prompt set); every run holds every metric (no empty cells in the compare table); no parameter is
an absolute path; each run lasts its generate_seconds + score_seconds. It prints the table, then
loads the run comparison page (``#/compare-runs?runs=[...]&experiments=[...]``) in a headless
browser -- Debian's chromium (``apt-get install -y chromium``) or Playwright's Chromium -- and
writes a screenshot. Without either browser it says so and the REST checks decide the exit code.
The server is stopped at the end (its own process group). Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.eval_models import tracking_uri  # noqa: E402
from benchmarks.report import load_runs  # noqa: E402
from rtdmd.tracking import latest_experiment  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
#: the parameters that make one evaluation configuration (one row of the compare table)
CONFIG_PARAMS = ("checkpoint", "method", "sampler", "steps", "guidance", "eta", "seed", "images_per_prompt",
                 "prompt_set", "prompt_count")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw


# ---------------------------------------------------------------------------- the server


def start_server(uri: str, timeout: float) -> tuple[subprocess.Popen, str, Path]:
    """``mlflow ui`` on a free port, in its own process group: (process, base URL, log file), once it answers."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="mlflow-ui-")) / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while True:
        try:
            _get(base + "/health", timeout=5)  # answers once the app is up
            return server, base, log
        except OSError:
            if server.poll() is not None or time.time() - t0 > timeout:
                stop_server(server)
                raise RuntimeError(f"mlflow ui did not come up ({'exited' if server.poll() is not None else 'timeout'});"
                                   f" see {log}") from None
            time.sleep(1)


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers: the group we started
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def rest_runs(base: str, exp_id: str) -> list[dict]:
    """The experiment's finished eval runs as the UI's REST API gives them: [{run_id, start, end, params, metrics}]."""
    out, token = [], None
    while True:
        body = {"experiment_ids": [exp_id], "filter": "tags.kind = 'eval' and attributes.status = 'FINISHED'",
                "max_results": 1000, **({"page_token": token} if token else {})}
        page = _get(base + "/api/2.0/mlflow/runs/search", body)
        for r in page.get("runs", []):
            data = r.get("data", {})
            out.append({"run_id": r["info"]["run_id"], "start": int(r["info"].get("start_time", 0)),
                        "end": int(r["info"].get("end_time", 0) or 0),
                        "params": {p["key"]: p["value"] for p in data.get("params", [])},
                        "metrics": {m["key"]: float(m["value"]) for m in data.get("metrics", [])}})
        token = page.get("next_page_token")
        if not token:
            return out


# ---------------------------------------------------------------------------- the checks


def table_problems(runs: list[dict], want: list[str]) -> list[str]:
    """What keeps ``runs`` (rest_runs' rows) from reading as one method-by-metric table; empty when none."""
    problems = []
    if sorted(r["run_id"] for r in runs) != sorted(want):
        problems.append(f"the UI lists {len(runs)} eval runs but mlflow.search_runs lists {len(want)} (different runs)")
    metrics = sorted({m for r in runs for m in r["metrics"]})
    for r in runs:
        missing = [m for m in metrics if m not in r["metrics"]]
        if missing:
            problems.append(f"run {r['run_id']} ({r['params'].get('method')}) lacks {', '.join(missing)}")
        for k, v in r["params"].items():
            if v.startswith("/"):
                problems.append(f"run {r['run_id']} parameter {k} is an absolute path: {v}")
        m = r["metrics"]
        if "generate_seconds" in m and "score_seconds" in m and r["end"]:
            want_ms = 1000 * (m["generate_seconds"] + m["score_seconds"])
            if abs(r["end"] - r["start"] - want_ms) > 1000:
                problems.append(f"run {r['run_id']} lasts {(r['end'] - r['start']) / 1000:.1f} s, not its "
                                f"generate_seconds + score_seconds ({want_ms / 1000:.1f} s)")
    seen: dict[tuple, str] = {}
    for r in runs:
        key = tuple(r["params"].get(k) for k in CONFIG_PARAMS)
        if key in seen:
            problems.append(f"runs {seen[key]} and {r['run_id']} are the same configuration (two rows for one)")
        seen.setdefault(key, r["run_id"])
    return problems


def format_table(runs: list[dict]) -> str:
    """The compare page's content as text: one row per run, one column per metric."""
    metrics = sorted({m for r in runs for m in r["metrics"]})
    head = ["method", "checkpoint", "sampler", "steps", "CFG", "seed"] + metrics
    rows = [[r["params"].get(k, "") for k in ("method", "checkpoint", "sampler", "steps", "guidance", "seed")]
            + [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "" for m in metrics] for r in runs]
    return "\n".join(" | ".join(str(c) for c in row) for row in [head, *rows])


def screenshot(url: str, out: Path, chromium: str | None, window: str) -> str:
    """Render ``url`` headless into ``out``; returns what happened, one line (starts with 'skipped' without a browser)."""
    w, h = (int(v) for v in window.split(","))
    if chromium and Path(chromium).is_file():
        shot = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--window-size={w},{h}", "--virtual-time-budget=30000",
                               f"--screenshot={out.resolve()}", url], capture_output=True, text=True, timeout=300)
        if shot.returncode != 0 or not out.is_file():
            raise RuntimeError(f"chromium failed ({shot.returncode}): {shot.stderr[-500:]}")
        return f"chromium screenshot of {url} -> {out} ({out.stat().st_size} bytes)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return ("skipped the browser check: no headless browser here (no chromium binary, Playwright not installed; "
                "apt-get install -y chromium, or pip install playwright && playwright install chromium); "
                "the table was checked through the UI's REST API only")
    with sync_playwright() as p:
        browser = p.chromium.launch()
        page = browser.new_page(viewport={"width": w, "height": h})
        page.goto(url, wait_until="networkidle", timeout=120_000)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return f"playwright screenshot of {url} -> {out} ({out.stat().st_size} bytes)"


def check(uri: str, experiment: str, out: Path, chromium: str | None = None, window: str = "2200,2600",
          startup_timeout: float = 240.0) -> int:
    """Run every check (module docstring) on ``experiment`` in the store ``uri``; prints them; 0 when all pass."""

    df = load_runs(experiment, uri)
    if df.empty:
        print(f"experiment {experiment} has no finished eval runs", file=sys.stderr)
        return 1
    exp_id, want = str(df.iloc[0]["experiment_id"]), sorted(df["run_id"])
    server, base, log = start_server(uri, startup_timeout)
    try:
        print(f"mlflow ui up at {base}")
        runs = rest_runs(base, exp_id)
        problems = table_problems(runs, want)
        n_metrics = len({m for r in runs for m in r["metrics"]})
        print(f"UI REST API: {len(runs)} eval runs, {n_metrics} metrics\n{format_table(runs)}")
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        if not problems:
            print(f"every run has all {n_metrics} metrics; no absolute paths; durations = generate + score seconds")
        q = urllib.parse.quote(json.dumps(want)), urllib.parse.quote(json.dumps([exp_id]))
        out.parent.mkdir(parents=True, exist_ok=True)
        print(screenshot(f"{base}/#/compare-runs?runs={q[0]}&experiments={q[1]}", out, chromium, window))
        return 1 if problems else 0
    finally:
        stop_server(server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=None, help="default: the experiment of the newest eval run")
    ap.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ap.add_argument("--out", default=None, help="screenshot PNG (default reports/<experiment>/mlflow_compare.png)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--window", default="2200,2600", help="browser window WIDTH,HEIGHT")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    args = ap.parse_args()

    uri = tracking_uri(args.tracking_uri)
    experiment = args.experiment or latest_experiment(uri, "tags.kind = 'eval'")
    if experiment is None:
        print(f"no eval runs in {uri}; pass --experiment / --tracking-uri", file=sys.stderr)
        return 1
    out = Path(args.out or Path("reports") / experiment / "mlflow_compare.png")
    return check(uri, experiment, out, args.chromium, args.window, args.startup_timeout)


if __name__ == "__main__":
    sys.exit(main())
