"""Metrics: a local JSONL file (always) and MLflow (rank 0 only, best effort).

The embedded default store is ``sqlite:///<out>/mlflow.db`` (MLflow 3 refuses new file stores by
default); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` points elsewhere. MLflow failures never
stop training: the first one is reported with one warning, MLflow is switched off for the rest of the
run, and ``<out>/metrics.jsonl`` still receives every metric.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Keep a dead tracking server from stalling training in MLflow's retry loop.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def default_tracking_uri(out_dir: str | os.PathLike, configured: str = "") -> str:
    """The tracking URI: ``configured``, else ``MLFLOW_TRACKING_URI``, else sqlite under ``out_dir``.

    Args:
        out_dir: the run directory.
        configured: ``tracking.tracking_uri`` from the config.

    Returns:
        The URI.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """Rank-0 metrics sink. On other ranks every method is a no-op.

    Args:
        out_dir: the run directory (``metrics.jsonl`` goes there).
        active: True on rank 0.
        use_mlflow: also log to MLflow.
        tracking_uri: MLflow tracking URI (see :func:`default_tracking_uri`).
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        run_id: an existing MLflow run to continue (resume), or None for a new run.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        active: bool,
        use_mlflow: bool = True,
        tracking_uri: str = "",
        experiment: str = "wmtp",
        run_name: str = "",
        run_id: str | None = None,
    ):
        self.active = active
        self.out_dir = Path(out_dir)
        self.run_id: str | None = None
        self._client = None
        self._warned = False
        self._file = None
        if not active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / METRICS_FILE, "a")  # noqa: SIM115 (open for the run)
        if use_mlflow:
            self._guard(
                self._start, tracking_uri or default_tracking_uri(out_dir), experiment, run_name, run_id
            )

    def _start(self, uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        for key, value in _HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                found = client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else client.create_experiment(experiment)
                run_id = client.create_run(exp_id, run_name=run_name or None).info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
        self._client, self.run_id = client, run_id

    def _guard(self, fn, *args) -> None:
        """Run an MLflow call; on failure warn once and switch MLflow off."""
        if fn != self._start and self._client is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # any MLflow / network / DB failure must not stop training
            self._client = None
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"MLflow unavailable ({type(exc).__name__}: {exc}); training continues, metrics go to "
                    f"{self.out_dir / METRICS_FILE} only",
                    RuntimeWarning,
                    stacklevel=3,
                )

    @property
    def mlflow_ok(self) -> bool:
        """Whether MLflow is still receiving data."""
        return self._client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (e.g. the flattened resolved config).

        Args:
            params: name -> value (stringified).
        """
        if not self.active:
            return
        self._write({"params": {k: str(v) for k, v in params.items()}})
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._guard(lambda: self._client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log a step's metrics (non-finite values go to the JSONL file as null and are not sent).

        Args:
            metrics: name -> value.
            step: the global optimizer step.
        """
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._write({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}})
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in clean.items() if math.isfinite(v)]
        self._guard(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory as run artifacts.

        Args:
            path: the file or directory.
            artifact_path: destination inside the run's artifacts.
        """
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._guard(lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._guard(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run.

        Args:
            key: tag name.
            value: tag value.
        """
        if self.active:
            self._guard(lambda: self._client.set_tag(self.run_id, key, value))

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run and close the metrics file.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        """
        if not self.active:
            return
        self._guard(lambda: self._client.set_terminated(self.run_id, status))
        if self._file is not None:
            self._file.close()
            self._file = None
