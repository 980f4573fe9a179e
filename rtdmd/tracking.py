"""MLflow tracking: one place that talks to mlflow (imported lazily: it is slow to import).

Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow 3.x's default).
Compare runs with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import functools

import logging
import re
import os
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from rtdmd.errors import UserError
from rtdmd.runlock import DirLock


@functools.lru_cache(maxsize=None)
def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that ran ('+dirty' if the tree has local changes), or 'unknown'. Read once per
    process: a long run records the code it loaded, not a commit made while it trained."""
    root = Path(cwd or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_store(mlflow, uri: str, experiment: str | None = None) -> None:
    """Point ``mlflow`` at ``uri``, creating a new sqlite store (and ``experiment``) under a file lock, so
    processes that start together do not race through the schema migration."""
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        if experiment is not None:
            mlflow.set_experiment(experiment)
        return

    db = Path(uri[len("sqlite:///"):])
    with DirLock(db.parent if str(db.parent) else Path("."), name=f".{db.name}.lock", wait=True):
        mlflow.tracking.MlflowClient().search_experiments(max_results=1)  # creates and migrates the store
        if experiment is not None:
            mlflow.set_experiment(experiment)


class Tracker:
    """A thin wrapper: no-op when disabled, batched metric logging when enabled."""

    def __init__(self, enabled: bool, uri: str, experiment: str):
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self._mlflow = None
        self.run_id: str | None = None
        self._pending: list = []
        self._last_flush_ms = 0

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any], run_id: str | None = None,
              nested: bool = False) -> str | None:
        if not self.enabled:
            return None
        try:
            import mlflow
        except ImportError:
            raise UserError("MLflow is not installed; install it (pip install 'mlflow<3.18') or set tracking.enabled=false.") from None
        self._mlflow = mlflow
        open_store(mlflow, self.uri, self.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.set_tags(tags)
            items = [(k, v) for k, v in params.items()]
            for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
                mlflow.log_params({k: ("" if v is None else str(v)[:6000]) for k, v in items[i:i + 90]})
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        # batched (one sqlite write per batch), but at least every 30 s so the MLflow UI follows a slow run
        if len(self._pending) >= 200 or ts - self._last_flush_ms > 30_000:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            self._mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._last_flush_ms = int(time.time() * 1000)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow is not None:
            self.flush()
            self._mlflow.end_run(status=status)


# ---------------------------------------------------------------------------- reading a store (benchmarks)


def mlflow_at(uri: str, must_exist: bool = False):
    """mlflow pointed at the store ``uri`` (its INFO chatter silenced); ``must_exist``: refuse to create a new sqlite file."""
    if must_exist and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"no MLflow store at {db}; run 'rtdmd-bench eval' there first or pass --tracking-uri.")
    try:
        import mlflow
    except ImportError:
        raise UserError("MLflow is not installed; install it (pip install 'mlflow<3.18').") from None
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    open_store(mlflow, uri)
    return mlflow


def search_runs(uri: str, experiment: str, filter_string: str, must_exist: bool = False):
    """Runs of ``experiment`` in the store ``uri`` that match ``filter_string``, newest first (a pandas
    DataFrame, as mlflow.search_runs gives it); None when the experiment does not exist."""
    mlflow = mlflow_at(uri, must_exist)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"])


def download_artifact(uri: str, run_id: str, name: str, dst: Path) -> Path | None:
    """Artifact ``name`` of run ``run_id`` copied under ``dst``; None when the run has no such artifact."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    mlflow = mlflow_at(uri, must_exist=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(dst)))
    except Exception:  # the artifact is optional (fid runs have no per_prompt.csv)
        return None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of metric ``key`` of run ``run_id``, by step."""
    mlflow = mlflow_at(uri, must_exist=True)
    client = mlflow.tracking.MlflowClient()
    return sorted((h.step, h.value) for h in client.get_metric_history(run_id, key))
# ---------------------------------------------------------------------------- parent runs of multi-stage runs


def _client(uri: str):
    try:
        import mlflow
    except ImportError:
        raise UserError("MLflow is not installed; install it (pip install 'mlflow<3.18') or set tracking.enabled=false.") from None
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def open_parent_run(uri: str, experiment: str, marker: Path, run_name: str, tags: dict[str, str],
                    params: dict[str, Any]) -> str:
    """The parent MLflow run of a multi-stage run: the one ``marker`` names (set RUNNING again, on resume),
    or a new run with ``tags`` and ``params``, whose id is then written to ``marker``."""
    client = _client(uri)
    if marker.is_file():
        run_id = json.loads(marker.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
        client.log_batch(run_id, params=[Param(k, "" if v is None else str(v)[:6000]) for k, v in items[i:i + 90]])
    marker.write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def adopt_child_run(uri: str, parent_id: str, child_id: str | None, stage: str, minutes: float, checkpoint: Path) -> None:
    """Tag a stage's own run as a child of the parent run; log the stage's minutes and checkpoint on the parent."""
    client = _client(uri)
    if child_id:
        client.set_tag(child_id, "mlflow.parentRunId", parent_id)
    client.log_metric(parent_id, f"{stage}/train_minutes", minutes)
    client.set_tag(parent_id, f"{stage}_checkpoint", str(checkpoint))


def end_parent_run(uri: str, parent_id: str, status: str, checkpoint: Path | None = None) -> None:
    """Close the parent run with ``status`` (FINISHED, KILLED, FAILED), tagging the final checkpoint if given."""
    client = _client(uri)
    if checkpoint is not None:
        client.set_tag(parent_id, "checkpoint", str(checkpoint))
    client.set_terminated(parent_id, status=status)


# ---------------------------------------------------------------------------- paths in params, tags and reports


_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s\[\]@;,=()'\"]+")


def portable_path(path: str | Path, outside: str | None = None) -> str:
    """``path`` relative to the working directory when inside it, else ``outside`` (default: its last component)."""
    p = Path(path)
    fallback = outside if outside is not None else p.name
    try:
        full, cwd = p.resolve(), Path.cwd().resolve()
    except OSError:
        return fallback
    return full.relative_to(cwd).as_posix() if full.is_relative_to(cwd) else fallback


def portable_text(text: str) -> str:
    """``text`` (e.g. a scorer identity 'shapes_pref[/abs/bundle@sha256:...]') with every absolute path in it made
    portable (relative to the working directory when inside it, else its last component)."""
    return _ABS_PATH.sub(lambda m: portable_path(m.group(0)), text)


# ---------------------------------------------------------------------------- finding experiments and keyed runs


def experiment_names(uri: str) -> list[str]:
    """The names of the store's active experiments, oldest first (empty when a sqlite store does not exist yet)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return []
    mlflow = mlflow_at(uri)
    return [e.name for e in sorted(mlflow.search_experiments(), key=lambda e: int(e.experiment_id)
                                   if str(e.experiment_id).isdigit() else 0)]


def latest_experiment(uri: str, filter_string: str = "") -> str | None:
    """The experiment of the newest run (by start time) matching ``filter_string`` in the store, or None."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    mlflow = mlflow_at(uri)
    client = mlflow.tracking.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=filter_string, max_results=1, order_by=["attributes.start_time DESC"])
    return client.get_experiment(runs[0].info.experiment_id).name if runs else None


def open_keyed_run(uri: str, experiment: str, key_tag: str, key: str, run_name: str, tags: dict[str, str],
                   params: dict[str, Any], start_ms: int) -> dict:
    """The run of ``experiment`` whose tag ``key_tag`` is ``key``, or a new one started at ``start_ms`` (epoch ms)
    with ``tags`` and ``params``: {"run_id", "created", "start_ms", "metrics", "tags"} (the metrics and tags it
    already holds)."""
    mlflow = mlflow_at(uri)
    open_store(mlflow, uri, experiment)
    client = mlflow.tracking.MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.{key_tag} = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        run = found[0]
        return {"run_id": run.info.run_id, "created": False, "start_ms": int(run.info.start_time),
                "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}
    run = client.create_run(exp_id, start_time=int(start_ms), tags={**tags, key_tag: key}, run_name=run_name)
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
        client.log_batch(run.info.run_id, params=[Param(k, "" if v is None else str(v)[:6000]) for k, v in items[i:i + 90]])
    return {"run_id": run.info.run_id, "created": True, "start_ms": int(start_ms), "metrics": {}, "tags": {}}


def close_keyed_run(uri: str, run_id: str, tags: dict[str, str], metrics: dict[str, float],
                    artifacts: list[tuple[Path, str | None]], end_ms: int, status: str = "FINISHED") -> None:
    """Log ``tags``, ``metrics`` (step 0) and ``artifacts`` ((local path, artifact folder or None)) to ``run_id`` and
    end it with ``status`` at ``end_ms`` (epoch ms)."""
    from mlflow.entities import Metric, RunTag

    client = mlflow_at(uri).tracking.MlflowClient()
    ts = int(time.time() * 1000)
    tag_items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(tag_items), 90):
        client.log_batch(run_id, tags=tag_items[i:i + 90])
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    for path, folder in artifacts:
        client.log_artifact(run_id, str(path), folder)
    client.set_terminated(run_id, status=status, end_time=int(end_ms))


class LogWindow:
    """The scalars of the steps since the last log point: each key's mean over the steps that reported it
    (a network updated every few steps, or a diagnostic of logged steps only, is not lost between log points)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        """Each key's mean since the last call; the window starts afresh."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out
