"""The one way this project opens MLflow: ``MlflowClient(tracking_uri=..., registry_uri=...)``.

MLflow's process-wide state (``mlflow.set_tracking_uri`` / ``set_registry_uri``, the active
run or experiment) is neither set nor relied on: every call goes through a client bound to one
URI, so two pipelines with different stores in one process never share one.

A deleted SQLite store. MLflow keeps one SQLAlchemy engine (and one store object) per
database URI for the life of the process. When the run folder is removed between two
pipelines of one process (a served flow, a test), the engine of the old URI still points at
the unlinked file and every write fails with "attempt to write a readonly database".
``store_uri`` therefore gives the same file a URI MLflow has not seen yet each time a file
this process opened before is found missing: ``sqlite:///<path>?ssr-generation=<n>``
(SQLAlchemy's SQLite driver ignores, with a warning, query fields it does not know; the file is
the same). Until then the URI stays as given. This needs no private attribute of MLflow; the
generation counter is the one piece of process state here, and it exists because MLflow's
engine cache does.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

GENERATION_FIELD = "ssr-generation"
_generations: dict[str, int] = {}  # SQLite file path -> how many times this process found it missing


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string left out), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def store_uri(uri: str) -> str:
    """``uri`` as this process opens it: a SQLite file that this process opened before and
    finds missing now gets a new generation (a URI with no engine cached yet); other URIs,
    and a file never opened here, come back as they are. Call it once per client."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    key = str(path.resolve())
    if key in _generations and not path.exists():
        _generations[key] += 1
    generation = _generations.setdefault(key, 0)
    if generation == 0:
        return uri
    base, _, query = uri.partition("?")
    fields = [(k, v) for k, v in urllib.parse.parse_qsl(query) if k != GENERATION_FIELD] + [
        (GENERATION_FIELD, str(generation))
    ]
    return f"{base}?{urllib.parse.urlencode(fields)}"


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` (as ``store_uri`` gave it) for tracking and registry alike."""
    from mlflow import MlflowClient  # lazy: MLflow takes seconds to import; only the steps that track pay for it

    return MlflowClient(tracking_uri=uri, registry_uri=uri)
