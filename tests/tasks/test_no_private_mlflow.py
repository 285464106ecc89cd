"""The project talks to MLflow through its public API only (STYLE.md 12): no ``mlflow.<...>._x``
attribute and no underscore name imported from mlflow, in ssr_tasks/ and flows/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_ATTRIBUTE = re.compile(r"mlflow\..*\._")


def _sources() -> list[Path]:
    files = sorted(p for folder in ("ssr_tasks", "flows") for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 10, "the sources were not found"
    return files


def _private_imports(tree: ast.AST) -> list[str]:
    """``from mlflow... import _x``, ``import mlflow._x`` / ``from mlflow._x import y``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlflow":
            parts = node.module.split(".")
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith("_") or any(p.startswith("_") for p in parts)
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "mlflow" and any(p.startswith("_") for p in a.name.split("."))
            ]
    return found


def test_no_private_mlflow_attribute_or_import():
    hits = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        hits += [
            f"{rel}:{i}: {line.strip()}"
            for i, line in enumerate(text.splitlines(), 1)
            if PRIVATE_ATTRIBUTE.search(line)
        ]
        hits += [f"{rel}: {imp}" for imp in _private_imports(ast.parse(text, str(rel)))]
    assert not hits, "private MLflow names (use MlflowClient and MLflow's public functions):\n" + "\n".join(hits)


def test_the_check_finds_what_it_looks_for():
    assert PRIVATE_ATTRIBUTE.search("saved = tracking_utils._tracking_uri if mlflow.tracking._x else 1")
    assert PRIVATE_ATTRIBUTE.search("engine = mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore._engine_map")
    assert not PRIVATE_ATTRIBUTE.search("client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)")
    code = (
        "from mlflow.tracking._model_registry import utils\nfrom mlflow.tracking import _tracking_service\n"
        "import mlflow._private\nfrom mlflow import MlflowClient\n"
    )
    assert _private_imports(ast.parse(code)) == [
        "from mlflow.tracking._model_registry import utils",
        "from mlflow.tracking import _tracking_service",
        "import mlflow._private",
    ]
