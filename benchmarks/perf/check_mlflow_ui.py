"""Check that the MLflow UI shows an experiment's eval runs side by side, and screenshot it.

    python benchmarks/perf/check_mlflow_ui.py --experiment teacher-steps \
        [--tracking-uri sqlite:///mlflow.db] [--out reports/teacher-steps/mlflow_compare.png]

Starts ``mlflow ui --backend-store-uri <uri>`` on a free local port (one worker), asks its
REST API for the experiment's runs and checks they are exactly the eval runs that
``mlflow.search_runs`` (pandas, what ``rtdmd-bench report`` reads) returns, then loads the
run comparison page (``#/compare-runs?runs=[...]&experiments=[...]``) in headless Chromium
and writes a screenshot. Needs Debian's chromium (``apt-get install -y chromium``). The
server is stopped at the end (its own process group). Not part of the test suite.
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

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ap.add_argument("--out", default=None, help="screenshot PNG (default reports/<experiment>/mlflow_compare.png)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--window", default="2200,2600", help="browser window WIDTH,HEIGHT")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    args = ap.parse_args()

    from benchmarks.report import load_runs
    from benchmarks.runner import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    df = load_runs(args.experiment, uri)
    if df.empty:
        print(f"experiment {args.experiment} has no finished eval runs", file=sys.stderr)
        return 1
    exp_id = str(df.iloc[0]["experiment_id"])
    want = sorted(df["run_id"])
    out = Path(args.out or Path("reports") / args.experiment / "mlflow_compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not Path(args.chromium).is_file():
        print(f"chromium not found at {args.chromium}; apt-get install -y chromium", file=sys.stderr)
        return 1

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = open(Path(tempfile.mkdtemp(prefix="mlflow-ui-")) / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            try:
                _get(base + "/health", timeout=5)  # answers once the app is up
                break
            except OSError:
                if server.poll() is not None:
                    print(f"mlflow ui exited with {server.returncode}; see {log.name}", file=sys.stderr)
                    return 1
                if time.time() - t0 > args.startup_timeout:
                    print(f"mlflow ui did not answer within {args.startup_timeout:.0f} s", file=sys.stderr)
                    return 1
                time.sleep(2)
        print(f"mlflow ui up at {base} after {time.time() - t0:.0f} s")
        runs = _get(base + "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp_id], "filter": "tags.kind = 'eval' and attributes.status = 'FINISHED'",
                     "max_results": 1000})
        shown = sorted(r["info"]["run_id"] for r in runs.get("runs", []))
        same = shown == want
        print(f"UI API lists {len(shown)} eval runs; pandas search_runs lists {len(want)}: "
              f"{'the same runs' if same else 'DIFFERENT runs'}")
        q = urllib.parse.quote(json.dumps(want)), urllib.parse.quote(json.dumps([exp_id]))
        url = f"{base}/#/compare-runs?runs={q[0]}&experiments={q[1]}"
        shot = subprocess.run([args.chromium, *CHROMIUM_FLAGS, f"--window-size={args.window}",
                               "--virtual-time-budget=30000", f"--screenshot={out.resolve()}", url],
                              capture_output=True, text=True, timeout=300)
        if shot.returncode != 0 or not out.is_file():
            print(f"chromium failed ({shot.returncode}): {shot.stderr[-500:]}", file=sys.stderr)
            return 1
        print(f"screenshot of {url} -> {out} ({out.stat().st_size} bytes)")
        return 0 if same else 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers: the group we started
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
