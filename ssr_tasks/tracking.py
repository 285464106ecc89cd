"""The one MLflow adapter of the project: runs, metrics, artefacts and the registry.

Model code returns metrics; only this module talks to MLflow.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

from ssr_tasks.handoffs import RegisteredModel
from ssr_tasks.services import check_mlflow, mlflow_artifact_root, mlflow_tracking_uri, redact_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
PIP_REQUIREMENTS = ["torch", "numpy", "ssr-pipeline"]


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


class Tracker:
    """MLflow tracking for one pipeline (one experiment per task)."""

    def __init__(self, experiment: str, run_dir: Path, tracking_uri: str | None = None):
        self.uri = tracking_uri or mlflow_tracking_uri(run_dir)
        check_mlflow(self.uri)
        mlflow = _mlflow()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
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

    @property
    def safe_uri(self) -> str:
        return redact_uri(self.uri)

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
        mlflow = _mlflow()
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name, nested=nested, tags=dict(tags or {})) as run:
            yield run

    def log_params(self, params: Mapping[str, Any]) -> None:
        _mlflow().log_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _mlflow().log_metrics({metric_name(k): float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        _mlflow().log_dict(obj, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(path), artifact_path)

    # ---- registry -----------------------------------------------------------------

    def log_and_register(
        self,
        model: Any,
        name: str,
        tags: Mapping[str, str],
        val_metric: float,
        compare_on: tuple[str, ...] = ("dataset", "backbone"),
    ) -> RegisteredModel:
        """Log ``model`` in the active run, register it and move ``champion`` if it wins.

        ``champion-<dataset>-<backbone>`` follows the best version per dataset and
        backbone; ``champion`` moves when the registry has none yet or when the new version
        beats the current champion trained on the same dataset and backbone. A failed
        registration deletes the half-made version and puts back the aliases it had
        already moved before re-raising, so no alias is lost or left on a missing version.
        """
        mlflow = _mlflow()
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            pip_requirements=PIP_REQUIREMENTS,
        )
        from mlflow.exceptions import MlflowException  # MLflow: see _mlflow

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        version = None
        previous: dict[str, str | None] = {}  # aliases moved so far -> version they pointed at
        try:
            mv = self.client.create_model_version(name, info.model_uri, run_id=info.run_id)
            version = mv.version
            all_tags = {**tags, "val_metric": f"{val_metric:.6f}"}
            for key, value in all_tags.items():
                self.client.set_model_version_tag(name, version, key, str(value))
            moved = self._move_champions(name, version, all_tags, val_metric, compare_on, previous)
        except Exception:
            if version is not None:
                with contextlib.suppress(Exception):
                    self.client.delete_model_version(name, version)
            for alias, old in previous.items():
                if old is not None:
                    with contextlib.suppress(Exception):
                        self.client.set_registered_model_alias(name, alias, old)
            raise
        return RegisteredModel(name, int(version), f"models:/{name}/{version}", tuple(moved), info.run_id, self.safe_uri)

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
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    from mlflow.exceptions import MlflowException  # MLflow: see _mlflow

    try:
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
