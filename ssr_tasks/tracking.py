"""The one MLflow adapter of the project: runs, metrics, artefacts and the registry.

Model code returns metrics; only this module talks to MLflow.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ssr_tasks import ssr_pyfunc
from ssr_tasks.handoffs import RegisteredModel
from ssr_tasks.liveness import PROCESS_TAG, process_gone, process_tag
from ssr_tasks.services import check_mlflow, mlflow_artifact_root, mlflow_tracking_uri, redact_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
PROJECT_DIR = Path(__file__).resolve().parent.parent
# What a registered model needs in a fresh environment: pinned versions of what it imports.
# The project itself travels as code (code_paths): ssr_model and the pyfunc loader.
CODE_PATHS = [str(PROJECT_DIR / "ssr_model"), str(Path(ssr_pyfunc.__file__))]
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def pip_requirements() -> list[str]:
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


def _mlflow():
    import mlflow  # MLflow takes seconds to import; only the steps that track pay for it

    return mlflow


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


@contextlib.contextmanager
def process_uris(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's model logging reads the process-wide tracking and registry URIs and the
    active experiment, and ``mlflow.set_tracking_uri`` also writes the URIs into
    ``os.environ`` (MLflow 3.17): set them for the call only, then put back what was
    there, so two pipelines with different stores in one process never share the first
    one's."""
    from mlflow.tracking import fluent  # the globals that set_*_uri and set_experiment write
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    mlflow = _mlflow()
    saved_env = {key: os.environ.get(key) for key in URI_VARIABLES}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment_id is not None:
        fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _ServableTorch:
    """The flavor handed to ``mlflow.models.Model.log``: MLflow's pytorch flavor (so
    ``mlflow.pytorch.load_model`` gives the nn.Module back) whose ``python_function`` flavor
    is served by ``ssr_pyfunc`` (dict inputs, any number of queries)."""

    __name__ = "mlflow.pytorch"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs) -> None:
        _mlflow().pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = "ssr_pyfunc"
        mlflow_model.save(os.path.join(path, "MLmodel"))


def model_signature(model: Any):
    """Named float32 tensor inputs (``ssr_pyfunc.input_shapes``) -> int64 class ids (n,) or
    re-ranked positions (B, k)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), shape, name) for name, shape in ssr_pyfunc.input_shapes(model).items()])
    out_shape = (-1, model.ssr.k) if hasattr(model, "rerank") else (-1,)
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.int64), out_shape)]))


def forget_deleted_sqlite(uri: str) -> None:
    """MLflow keeps one SQLAlchemy engine per database URI for the life of the process. When
    the SQLite file was deleted meanwhile (the run folder removed between two runs of a
    served flow or a test), that engine writes into the unlinked file and fails with
    "readonly database": drop it, so the next store creates a new file."""
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    for store in (SqlAlchemyStore, RegistryStore):
        engine = store._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    for registry in (TrackingStoreRegistry, ModelRegistryStoreRegistry):  # the stores built on those engines
        registry._get_store_with_resolved_uri.cache_clear()


class Tracker:
    """MLflow tracking for one pipeline (one experiment per task).

    Everything goes through one ``MlflowClient`` bound to this tracker's URI, with the
    open runs kept here (innermost last): nothing of MLflow's process-wide state (active
    run, URIs, environment) is set, except around ``log_model`` (see ``process_uris``).
    """

    def __init__(self, experiment: str, run_dir: Path, tracking_uri: str | None = None):
        self.uri = tracking_uri or mlflow_tracking_uri(run_dir)
        check_mlflow(self.uri)
        forget_deleted_sqlite(self.uri)
        mlflow = _mlflow()
        self.client = mlflow.MlflowClient(self.uri, self.uri)
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
            base = urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
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
        if nested and self._open:
            all_tags["mlflow.parentRunId"] = self._open[-1]
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
        orphans = [r for r in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                                      max_results=1000)
                   if process_gone(r.data.tags.get(PROCESS_TAG, ""))]
        for r in orphans:
            self.client.set_terminated(r.info.run_id, "KILLED")
            log.info("MLflow run %s (%s) was left RUNNING by a process that is gone: ended as KILLED",
                     r.info.run_id, r.info.run_name)
        return len(orphans)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
        from mlflow.entities import Metric

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
        found = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                        f"tags.`ssr.trial` = '{trial}'", max_results=1)
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

    # ---- registry -----------------------------------------------------------------

    def log_model(self, model: Any) -> Any:
        """Log ``model`` in the innermost open run as a servable MLflow model: the pytorch
        flavor (pickled, with its class), the ``ssr_pyfunc`` python_function flavor, a
        signature and an input example, ``ssr_model`` as code and pinned requirements. The
        run's metrics at step 0 are linked to the logged model. Returns MLflow's ModelInfo."""
        from mlflow.models import Model

        with process_uris(self.uri, self.experiment_id):
            return Model.log(artifact_path=None, name="model", flavor=_ServableTorch(), run_id=self.run_id, pytorch_model=model,
                             serialization_format="pickle", code_paths=CODE_PATHS, pip_requirements=pip_requirements(),
                             signature=model_signature(model), input_example=ssr_pyfunc.input_example(model))

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
        """Log ``model`` in the open run (``log_model``), register it and move ``champion`` if it wins.

        ``champion-<dataset>-<backbone>`` follows the best version per dataset and
        backbone; ``champion`` moves when the registry has none yet or when the new version
        beats the current champion trained on the same dataset and backbone. The version
        carries ``description`` (the results table) and the registered model
        ``model_description``. A failed registration deletes the half-made version and
        puts back the aliases it had already moved before re-raising, so no alias is lost
        or left on a missing version. ``promote`` False (SSR did not improve on validation)
        registers the version without moving any alias.
        """
        info = self.log_model(model)
        from mlflow.exceptions import MlflowException  # MLflow: see _mlflow

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=model_description or None)
        else:
            if model_description:
                self.client.update_registered_model(name, description=model_description)
        version = None
        previous: dict[str, str | None] = {}  # aliases moved so far -> version they pointed at
        try:
            with process_uris(self.uri):  # the registry resolves the logged model through the process-wide URI
                mv = self.client.create_model_version(name, info.model_uri, run_id=info.run_id,
                                                      description=description or None, model_id=info.model_id)
            version = mv.version
            all_tags = {**tags, "val_metric": f"{val_metric:.6f}"}
            for key, value in all_tags.items():
                self.client.set_model_version_tag(name, version, key, str(value))
            moved = self._move_champions(name, version, all_tags, val_metric, compare_on, previous) if promote else []
        except Exception:
            if version is not None:
                with contextlib.suppress(Exception):
                    self.client.delete_model_version(name, version)
            for alias, old in previous.items():
                if old is not None:
                    with contextlib.suppress(Exception):
                        self.client.set_registered_model_alias(name, alias, old)
            raise
        return RegisteredModel(name, int(version), f"models:/{name}/{version}", tuple(moved), info.run_id, self.safe_uri,
                               info.model_id)

    def _alias_version(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException  # MLflow: see _mlflow

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def _move_champions(self, name, version, tags, val_metric, compare_on, previous: dict) -> list[str]:
        moved = []
        key = "-".join(str(tags.get(k, "")) for k in compare_on)
        pair_alias = f"{CHAMPION}-{key}".replace("_", "-")
        for alias, same_only in ((pair_alias, True), (CHAMPION, False)):
            current = self._alias_version(name, alias)
            wins = current is None
            if current is not None:
                same = all(current.tags.get(k) == str(tags.get(k)) for k in compare_on)
                cur_val = float(current.tags.get("val_metric", "-inf"))
                # compare at the precision the tag stores, so an equal score never counts as a win
                wins = same and round(val_metric, 6) > cur_val
            if wins:
                previous[alias] = None if current is None else current.version
                self.client.set_registered_model_alias(name, alias, version)
                moved.append(alias)
        return moved


def load_registered_model(uri: str, tracking_uri: str | None = None) -> Any:
    """The Python model a registry URI names (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``), loaded on the CPU from the tracking server at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI`` or the run folder's SQLite)."""
    tracking_uri = tracking_uri or mlflow_tracking_uri()
    check_mlflow(tracking_uri)
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException  # MLflow: see _mlflow

    try:
        with process_uris(tracking_uri):
            return mlflow.pytorch.load_model(uri, map_location="cpu")
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model {uri}: cannot be loaded from the registry at {redact_uri(tracking_uri)} ({first})") from None


def registered_models(tracking_uri: str | None = None) -> list[tuple[str, dict[str, str], list[tuple[str, dict[str, str]]]]]:
    """The registry's models: (name, alias -> version, [(version, tags)]) each (for ``ssr models``)."""
    uri = tracking_uri or mlflow_tracking_uri()
    client = _mlflow().MlflowClient(uri, uri)
    return [(rm.name, dict(rm.aliases or {}), [(str(mv.version), dict(mv.tags)) for mv in client.search_model_versions(f"name='{rm.name}'")])
            for rm in client.search_registered_models()]
