"""The MLflow adapter of a pipeline: its runs, params, metrics, tags and artefacts (``Tracker``).

Model code returns metrics; only the Tracker and what it calls talk to MLflow: the model
flavour and its logging in ``ssr_tasks.servable``, the registry and the champion aliases in
``ssr_tasks.registry``, the client in ``ssr_tasks.mlflow_store``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ssr_tasks.handoffs import RegisteredModel
from ssr_tasks.liveness import PROCESS_TAG, process_gone, process_tag
from ssr_tasks.mlflow_store import mlflow_client, store_uri
from ssr_tasks.registry import CHAMPION, load_registered_model, register_logged_model, registered_models
from ssr_tasks.servable import log_servable
from ssr_tasks.services import check_mlflow, mlflow_artifact_root, mlflow_tracking_uri, redact_uri

log = logging.getLogger(__name__)

# CHAMPION, load_registered_model and registered_models live in ssr_tasks.registry (importable here too)
__all__ = ["CHAMPION", "Tracker", "flatten", "load_registered_model", "metric_name", "registered_models"]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> flat ``a.b`` string params (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def metric_name(name: str) -> str:
    """MLflow refuses some characters (``@`` among them) in metric names."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


class Tracker:
    """MLflow tracking for one pipeline (one experiment per task).

    Everything goes through one ``MlflowClient(tracking_uri=uri, registry_uri=uri)``, with
    the open runs kept here (innermost last): nothing of MLflow's process-wide state (active
    run or experiment, URIs, environment) is read or set. ``uri`` is the store as this process
    opens it (``mlflow_store.store_uri``: a SQLite file deleted meanwhile gets a new URI).
    """

    def __init__(self, experiment: str, run_dir: Path, tracking_uri: str | None = None):
        self.uri = tracking_uri or mlflow_tracking_uri(run_dir)
        check_mlflow(self.uri)
        self.uri = store_uri(self.uri)
        self.client = mlflow_client(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if not self.uri.startswith(("http://", "https://", "databricks")):
                artifact_location = mlflow_artifact_root(run_dir) + f"/{experiment}"
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.experiment = experiment
        self._open: list[str] = []

    @property
    def safe_uri(self) -> str:
        return redact_uri(self.uri)

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI: the tracking server itself, or the local UI of
        ``ssr services start`` (127.0.0.1, ``SSR_MLFLOW_PORT``) over a SQLite store."""
        parts = urllib.parse.urlsplit(self.uri)
        if parts.scheme in ("http", "https"):
            base = urllib.parse.urlunsplit(
                parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
            )
        else:
            base = f"http://127.0.0.1:{os.environ.get('SSR_MLFLOW_PORT', '5000')}"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    @property
    def run_id(self) -> str:
        if not self._open:
            raise RuntimeError(f"MLflow experiment {self.experiment!r}: no open run (use `with tracker.run(...)`)")
        return self._open[-1]

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
        """Open a run (a child of the innermost open run when ``nested``); it ends FINISHED,
        or FAILED / KILLED when the block raises."""
        all_tags = {**dict(tags or {}), PROCESS_TAG: process_tag()}
        parent = self._open[-1] if nested and self._open else None
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self._open.append(run.info.run_id)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._open.pop()
            self.client.set_terminated(run.info.run_id, status)

    def close_orphans(self) -> int:
        """End as KILLED the runs of this experiment still RUNNING whose process is gone (a
        killed flow process cannot end its runs; see ``process_gone``). Returns how many."""
        orphans = [
            r
            for r in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
            if process_gone(r.data.tags.get(PROCESS_TAG, ""))
        ]
        for r in orphans:
            self.client.set_terminated(r.info.run_id, "KILLED")
            log.info(
                "MLflow run %s (%s) was left RUNNING by a process that is gone: ended as KILLED",
                r.info.run_id,
                r.info.run_name,
            )
        return len(orphans)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: MLflow loads only when a step tracks (see mlflow_store)

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
        from mlflow.entities import Metric  # lazy: as in log_params

        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step or 0, model_id=model_id) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @contextlib.contextmanager
    def trial_run(self, name: str, trial: str, tags: Mapping[str, str] | None = None) -> Iterator[bool]:
        """Open the nested run of one training trial (tag ``ssr.trial``) under the open run:
        the one ``live_trial_callback`` made while the trial trained, reopened, or a new one.
        Yields whether it was logged live (its curves are then already there)."""
        parent = self.run_id
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and tags.`ssr.trial` = '{trial}'",
            max_results=1,
        )
        if not found:
            with self.run(name, tags={**dict(tags or {}), "ssr.trial": trial}, nested=True):
                yield False
            return
        run_id = found[0].info.run_id
        self._open.append(run_id)
        try:
            yield True
        finally:
            self._open.pop()
            self.client.set_terminated(run_id, "FINISHED")

    # ---- the model of the run -----------------------------------------------------

    def log_model(self, model: Any) -> Any:
        """Log ``model`` in the innermost open run as a servable MLflow model
        (``servable.log_servable``); the run's metrics at step 0 are linked to it. Returns
        MLflow's ModelInfo."""
        return log_servable(self.client, self.experiment_id, self.run_id, model)

    def log_and_register(
        self,
        model: Any,
        name: str,
        tags: Mapping[str, str],
        val_metric: float,
        compare_on: tuple[str, ...] = ("dataset", "backbone"),
        description: str = "",
        model_description: str = "",
        promote: bool = True,
    ) -> RegisteredModel:
        """Log ``model`` in the open run (``log_model``), register it and move ``champion``
        if it wins (``registry.register_logged_model``: the rules, the descriptions, and
        what a failed registration puts back). ``promote`` False (SSR did not improve on
        validation) registers the version without moving any alias."""
        info = self.log_model(model)
        version, moved = register_logged_model(
            self.client,
            info.model_id,
            info.run_id,
            name,
            tags,
            val_metric,
            compare_on,
            description,
            model_description,
            promote,
        )
        return RegisteredModel(
            name, int(version), f"models:/{name}/{version}", tuple(moved), info.run_id, self.safe_uri, info.model_id
        )
