"""The MLflow model registry: registering a logged model, the champion aliases, and reading
registered models back, all through an ``MlflowClient`` bound to one URI (``mlflow_store``).

``champion-<dataset>-<backbone>`` follows the best version per dataset and backbone;
``champion`` moves when the registry has none yet or when the new version beats the current
champion trained on the same dataset and backbone (validation score, tag ``val_metric``).
Versions of different kinds (``KIND_TAGS``: few-shot SSR trained on balanced or on
Dirichlet query sets) never compete: a version never displaces an alias held by another kind.
The few-shot pipeline also registers each kind under its own name
(``FewShotParams.registered_name``), so each has its own champions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from ssr_tasks.mlflow_store import mlflow_client, store_uri
from ssr_tasks.services import check_mlflow, mlflow_tracking_uri, redact_uri

CHAMPION = "champion"
# Tags that make versions different models, with the value a version without the tag has:
# SSR trained on balanced query sets or on Dirichlet ones (their validation episodes differ too).
KIND_TAGS = {"query_balance": "balanced"}


def same_kind(current_tags: Mapping[str, str], tags: Mapping[str, str]) -> bool:
    """Whether two versions' tags name the same kind of model (``KIND_TAGS``)."""
    return all(str(current_tags.get(k, default)) == str(tags.get(k, default)) for k, default in KIND_TAGS.items())


def _alias_version(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException  # lazy: MLflow is imported when a step tracks (mlflow_store)

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _move_champions(
    client: Any,
    name: str,
    version: str,
    tags: Mapping[str, str],
    val_metric: float,
    compare_on: tuple[str, ...],
    previous: dict[str, str | None],
) -> list[str]:
    """Point the pair alias, then ``champion``, at ``version`` where it wins; ``previous``
    records each moved alias's old version (None: it had none) as it goes."""
    moved = []
    key = "-".join(str(tags.get(k, "")) for k in compare_on)
    pair_alias = f"{CHAMPION}-{key}".replace("_", "-")
    for alias in (pair_alias, CHAMPION):
        current = _alias_version(client, name, alias)
        wins = current is None
        if current is not None:
            same = all(current.tags.get(k) == str(tags.get(k)) for k in compare_on) and same_kind(current.tags, tags)
            cur_val = float(current.tags.get("val_metric", "-inf"))
            # compare at the precision the tag stores, so an equal score never counts as a win
            wins = same and round(val_metric, 6) > cur_val
        if wins:
            previous[alias] = None if current is None else current.version
            client.set_registered_model_alias(name, alias, version)
            moved.append(alias)
    return moved


def register_logged_model(
    client: Any,
    model_id: str,
    run_id: str,
    name: str,
    tags: Mapping[str, str],
    val_metric: float,
    compare_on: tuple[str, ...] = ("dataset", "backbone"),
    description: str = "",
    model_description: str = "",
    promote: bool = True,
) -> tuple[str, list[str]]:
    """Register the logged model ``model_id`` (of run ``run_id``) as a new version of ``name``
    and move the champion aliases it wins (none when ``promote`` is False). Returns (version,
    aliases moved).

    The version's source is the logged model's artifact location (given with its ``model_id``):
    a ``models:/<model_id>`` source would make a SQLite registry look the logged model up
    through MLflow's process-wide tracking URI. It carries ``description`` (the results table)
    and the registered model ``model_description``. A failed registration deletes the
    half-made version and puts back the aliases it had already moved before re-raising, so no
    alias is lost or left on a missing version.
    """
    from mlflow.exceptions import MlflowException  # lazy: MLflow, see _alias_version

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=model_description or None)
    else:
        if model_description:
            client.update_registered_model(name, description=model_description)
    version = None
    previous: dict[str, str | None] = {}  # aliases moved so far -> version they pointed at
    try:
        source = client.get_logged_model(model_id).artifact_location
        mv = client.create_model_version(
            name, source, run_id=run_id, description=description or None, model_id=model_id
        )
        version = mv.version
        all_tags = {**tags, "val_metric": f"{val_metric:.6f}"}
        for key, value in all_tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        moved = _move_champions(client, name, version, all_tags, val_metric, compare_on, previous) if promote else []
    except Exception:
        if version is not None:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version)
        for alias, old in previous.items():
            if old is not None:
                with contextlib.suppress(Exception):
                    client.set_registered_model_alias(name, alias, old)
        raise
    return str(version), moved


def model_version(client: Any, uri: str) -> Any:
    """The ModelVersion a registry URI names: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    path = uri.removeprefix("models:/")
    if path == uri or not path:
        raise ValueError(f"model {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = path.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"model {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, version)


def load_registered_model(uri: str, tracking_uri: str | None = None) -> Any:
    """The Python model a registry URI names (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``), loaded on the CPU from the tracking server at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI`` or the run folder's SQLite).

    The version is looked up with the client (``get_model_version_by_alias`` /
    ``get_model_version``, ``get_model_version_download_uri``), its files fetched with
    ``mlflow.artifacts.download_artifacts(..., tracking_uri=...)`` (an ``mlflow-artifacts:``
    location is served by that tracking server) and loaded with ``mlflow.pytorch.load_model``:
    MLflow's ``load_model("models:/...")`` would resolve the name through the process-wide
    registry URI (a Ray actor has none set)."""
    tracking_uri = tracking_uri or mlflow_tracking_uri()
    check_mlflow(tracking_uri)
    import mlflow.artifacts  # lazy: MLflow, see _alias_version (the CLI imports this module)
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    store = store_uri(tracking_uri)
    client = mlflow_client(store)
    try:
        mv = model_version(client, uri)
        location = client.get_model_version_download_uri(mv.name, mv.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=store)
        return mlflow.pytorch.load_model(local, map_location="cpu")
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model {uri}: cannot be loaded from the registry at {redact_uri(tracking_uri)} ({first})"
        ) from None


def registered_models(
    tracking_uri: str | None = None,
) -> list[tuple[str, dict[str, str], list[tuple[str, dict[str, str]]]]]:
    """The registry's models: (name, alias -> version, [(version, tags)]) each (for ``ssr models``)."""
    client = mlflow_client(store_uri(tracking_uri or mlflow_tracking_uri()))
    return [
        (
            rm.name,
            dict(rm.aliases or {}),
            [(str(mv.version), dict(mv.tags)) for mv in client.search_model_versions(f"name='{rm.name}'")],
        )
        for rm in client.search_registered_models()
    ]
