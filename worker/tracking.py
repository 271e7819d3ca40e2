"""A job's MLflow run, when the deployment names a tracking server (`LORAJOBS_MLFLOW_URI`).

One run per job (every attempt of the job logs to the same run, found again by its
`lorajobs.job_id` tag), tagged with the job id, owner, kind and name, and at the end the
adapter's digest; params are the spec's resolved settings; metrics are what TensorBoard gets
(`train/loss`, `train/learning_rate`, `eval/loss`), sent in batches every few seconds.

Spoken over MLflow's REST API (`/api/2.0/mlflow/...`, stable since MLflow 1.x) with httpx,
which the control plane already uses, instead of the `mlflow` client package, whose
dependencies (databricks-sdk, OpenTelemetry, ...) every worker image would carry for a dozen
calls. Credentials come only from the node's environment (`MLFLOW_TRACKING_TOKEN`, or
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`) and are never logged. Tracking is a
view: any failure is one warning and the run is dropped, never the attempt.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

URI_ENV = "LORAJOBS_MLFLOW_URI"
EXPERIMENT_ENV = "LORAJOBS_MLFLOW_EXPERIMENT"
FLUSH_EVERY_S = 5.0
BATCH = 1000  # MLflow's limit of metrics per log-batch call
PARAMS = 100  # ... and of params


class MlflowRun:
    """The MLflow run of one job; `scalar` buffers, `flush` sends, `finish` ends it."""

    def __init__(self, uri: str, experiment: str, job: dict[str, str]) -> None:
        import httpx

        auth: Any = None
        headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (
                os.environ["MLFLOW_TRACKING_USERNAME"],
                os.environ.get("MLFLOW_TRACKING_PASSWORD", ""),
            )
        self.uri = uri.rstrip("/")
        self._http = httpx.Client(
            base_url=self.uri + "/api/2.0/mlflow", headers=headers, auth=auth, timeout=10
        )
        self.experiment, self.job = experiment, job
        self.run_id: str | None = None
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    @classmethod
    def from_env(cls, job: dict[str, str], params: dict[str, Any]) -> MlflowRun | None:
        """The job's run on the deployment's tracking server; None when none is named (or it
        cannot be reached: then one warning)."""
        uri = os.environ.get(URI_ENV, "").strip()
        if not uri:
            return None
        run = cls(uri, os.environ.get(EXPERIMENT_ENV, "").strip() or "lorajobs", job)
        try:
            run._start(params)
        except Exception as err:  # noqa: BLE001 - tracking is a view, never a failure
            log.warning("MLflow: no run at %s: %s", run.uri, _short(err))
            return None
        return run

    def _call(self, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
        r = self._http.request(
            method,
            path,
            json=body if method == "POST" else None,
            params=body if method == "GET" else None,
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def _experiment_id(self) -> str:
        try:
            got = self._call(
                "/experiments/get-by-name", {"experiment_name": self.experiment}, "GET"
            )
            return str(got["experiment"]["experiment_id"])
        except RuntimeError as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                raise
        return str(self._call("/experiments/create", {"name": self.experiment})["experiment_id"])

    def _start(self, params: dict[str, Any]) -> None:
        exp = self._experiment_id()
        job_id = self.job["lorajobs.job_id"]
        found = self._call(
            "/runs/search",
            {
                "experiment_ids": [exp],
                "filter": f"tags.`lorajobs.job_id` = '{job_id}'",
                "max_results": 1,
            },
        ).get("runs", [])
        if found:  # a later attempt of the same job: the same run goes on
            self.run_id = found[0]["info"]["run_id"]
            self._call("/runs/update", {"run_id": self.run_id, "status": "RUNNING"})
            return
        tags = [{"key": k, "value": v} for k, v in self.job.items()]
        created = self._call(
            "/runs/create",
            {
                "experiment_id": exp,
                "run_name": f"{self.job['lorajobs.name']}-{job_id}",
                "start_time": int(time.time() * 1000),
                "tags": tags,
            },
        )
        self.run_id = created["run"]["info"]["run_id"]
        items = [{"key": k, "value": str(v)[:6000]} for k, v in sorted(params.items())]
        for i in range(0, len(items), PARAMS):
            self._call("/runs/log-batch", {"run_id": self.run_id, "params": items[i : i + PARAMS]})

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Buffer one point; sent every FLUSH_EVERY_S seconds and at checkpoints."""
        if self.run_id is None:
            return
        self._buffer.append(
            {
                "key": tag,
                "value": float(value),
                "step": int(step),
                "timestamp": int(time.time() * 1000),
            }
        )
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.run_id is None or not self._buffer:
            return
        points, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        try:
            for i in range(0, len(points), BATCH):
                self._call(
                    "/runs/log-batch", {"run_id": self.run_id, "metrics": points[i : i + BATCH]}
                )
        except Exception as err:  # noqa: BLE001
            log.warning(
                "MLflow: metrics not sent, tracking stops for this attempt: %s", _short(err)
            )
            self.run_id = None

    def finish(self, ok: bool, tags: dict[str, str] | None = None) -> None:
        """Send what is left, add `tags` (the adapter's digest), and end the run."""
        if self.run_id is None:
            return
        self.flush()
        try:
            if tags:
                body = {
                    "run_id": self.run_id,
                    "tags": [{"key": k, "value": v} for k, v in tags.items()],
                }
                self._call("/runs/log-batch", body)
            status = "FINISHED" if ok else "FAILED"
            self._call(
                "/runs/update",
                {"run_id": self.run_id, "status": status, "end_time": int(time.time() * 1000)},
            )
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: run not ended: %s", _short(err))
        finally:
            self.run_id = None
            self._http.close()


def flat_params(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"training": {"steps": 10}}` -> `{"training.steps": 10}` (None values left out)."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        elif v is not None:
            out[key] = v
    return out


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
