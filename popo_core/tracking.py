"""The MLflow adapter: the only module that imports mlflow.

Runs are written through MlflowClient (no global active run), so a sweep can hold a parent run
open while trials log nested runs. SQLite stores shared by several processes can answer
"database is locked": every write is retried with backoff.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from popo_core.store_lock import init_lock

T = TypeVar("T")
DEFAULT_URI = "sqlite:///mlflow.db"
# Judged on a key's last dotted part: `hf_token`, `auth.token`, `db_password` are secrets;
# `max_new_tokens` and `forward_tokens` are not.
_SECRET_KEY = re.compile(r"(^|_)token$|secret|password|passwd|api_?key|credential", re.I)
_URL_PASSWORD = re.compile(r"(//[^:/@]+:)[^@/]+@")


def tracking_uri(uri: str | None = None) -> str:
    """uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Params safe to log: secret-looking keys dropped, passwords in URLs masked."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            continue
        out[key] = _URL_PASSWORD.sub(r"\1***@", str(value))[:6000]
    return out


def _retry(fn: Callable[[], T], tries: int = 8) -> T:
    for attempt in range(tries):
        try:
            return fn()
        except Exception as err:  # sqlite "database is locked" surfaces as several types
            if "locked" not in str(err).lower() and "busy" not in str(err).lower() or attempt == tries - 1:
                raise
            time.sleep(min(0.1 * 2**attempt, 3.0))
    raise AssertionError("unreachable")


def client(uri: str | None = None):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # after import: mlflow sets its own levels on import
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(mlflow_client, name: str) -> str:
    exp = _retry(lambda: mlflow_client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry(lambda: mlflow_client.create_experiment(name))
    except Exception:  # another process created it first
        return _retry(lambda: mlflow_client.get_experiment_by_name(name)).experiment_id


class MlflowRun:
    """One MLflow run: params, batched metrics, artifacts. Use as a context manager."""

    def __init__(
        self,
        *,
        uri: str | None = None,
        experiment: str = "popo",
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        enabled: bool = True,
        flush_every_s: float = 0.0,
    ):
        self.enabled = enabled
        self.run_id = run_id
        # Metrics are sent in batches at most this often (and by flush() and finish()): a write to
        # the store costs more than a tiny model's training step.
        self.flush_every_s = flush_every_s
        self._pending: list = []
        self._flushed_at = time.monotonic()
        if not enabled:
            return
        self.client = ready_client(uri)
        if run_id is None:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            exp_id = experiment_id(self.client, experiment)
            run = _retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags))
            self.run_id = run.info.run_id
        else:
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def __enter__(self) -> "MlflowRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        self.finish(status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact(params).items()]
        existing = _retry(lambda: self.client.get_run(self.run_id)).data.params
        items = [p for p in items if p.key not in existing]  # a resumed run keeps its params
        for start in range(0, len(items), 100):
            _retry(lambda: self.client.log_batch(self.run_id, params=items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the metrics logged since the last flush, whole steps to a call: the store commits a
        call at once, so a kill mid-flush leaves no step half-written (a resume goes by which steps
        MLflow holds)."""
        batches: list[list] = []
        for _, step in itertools.groupby(self._pending, key=lambda m: m.step):
            step = list(step)
            if not batches or len(batches[-1]) + len(step) > 1000:  # MLflow's limit per call
                batches.append([])
            batches[-1] += step
        self._pending = []
        for batch in batches:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=batch))
        self._flushed_at = time.monotonic()

    def last_step(self, key: str) -> int:
        """The highest step at which this run holds metric `key` (-1 if none)."""
        if not self.enabled:
            return -1
        history = _retry(lambda: self.client.get_metric_history(self.run_id, key))
        return max((m.step for m in history), default=-1)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            _retry(lambda: self.client.set_terminated(self.run_id, status=status))


def find_runs(uri: str | None, experiment: str, filter_string: str = "", max_results: int = 1000) -> list:
    """Runs of an experiment matching an MLflow filter string (empty list if none)."""
    c = client(uri)
    exp = _retry(lambda: c.get_experiment_by_name(experiment))
    if exp is None:
        return []
    return _retry(lambda: c.search_runs([exp.experiment_id], filter_string=filter_string, max_results=max_results))


_initialised: set[str] = set()


def ready_client(uri: str | None = None):
    """`client(uri)` whose store exists: the first use in a process creates it under a lock
    (popo_core.store_lock), so workers starting together don't race in its migrations."""
    resolved = tracking_uri(uri)
    if resolved in _initialised:
        return client(uri)
    with init_lock(resolved):  # MlflowClient() itself creates and migrates the store
        c = client(uri)
        _retry(lambda: c.search_experiments(max_results=1))
    _initialised.add(resolved)
    return c


def update_run(uri: str | None, run_id: str, *, tags: Mapping[str, Any] | None = None, status: str | None = None) -> None:
    """Tag an existing run in one write and, given a status, end it. Unlike `MlflowRun(run_id=...)` it
    does not mark the run RUNNING first."""
    from mlflow.entities import RunTag

    c = client(uri)
    if tags:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        _retry(lambda: c.log_batch(run_id, tags=items))
    if status:
        _retry(lambda: c.set_terminated(run_id, status=status))


def metric_history(uri: str | None, run_id: str, key: str) -> list:
    """Every logged value of one metric of a run, oldest first."""
    c = client(uri)
    return sorted(_retry(lambda: c.get_metric_history(run_id, key)), key=lambda m: m.timestamp)


def run_status(uri: str | None, run_id: str) -> str | None:
    """A run's status (RUNNING, FINISHED, FAILED, KILLED), None if the store has no such run."""
    try:
        return _retry(lambda: client(uri).get_run(run_id)).info.status
    except Exception as err:
        if "not found" in str(err).lower() or "RESOURCE_DOES_NOT_EXIST" in str(err):
            return None
        raise


def delete_run(uri: str | None, run_id: str) -> None:
    _retry(lambda: client(uri).delete_run(run_id))
