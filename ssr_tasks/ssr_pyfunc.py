"""The ``python_function`` flavor of the registered SSR models (``mlflow.pyfunc`` and
``mlflow models serve``).

This file travels inside every registered model (``code_paths``, as the top-level module
``ssr_pyfunc``, next to a copy of ``ssr_model``), so a model loads in a process where the
project is not installed. It imports only numpy and torch at the top, and MLflow when a
model is loaded.

Inputs (dicts of arrays, as the model signature names them):

- few-shot (``FewShotClassifier``): ``{"support": (n_way, n_shot, D), "query": (n, D)}``
  -> predicted class index per query, int64 of shape (n,), for any n >= 1;
- retrieval (``RetrievalReranker``): ``{"query": (B, D), "neighbours": (B, k, D)}`` ->
  the re-ranked order, int64 of shape (B, k): positions into each neighbour list, best
  first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

FEWSHOT_INPUTS = ("support", "query")
RETRIEVAL_INPUTS = ("query", "neighbours")


class SSRPredictor:
    """``predict(model_input)`` over a loaded ``FewShotClassifier`` or ``RetrievalReranker``."""

    def __init__(self, model: torch.nn.Module):
        self.model: Any = model.eval()  # duck-typed: a FewShotClassifier, or a RetrievalReranker (has rerank)
        self.kind = "retrieval" if hasattr(model, "rerank") else "fewshot"
        self.inputs = RETRIEVAL_INPUTS if self.kind == "retrieval" else FEWSHOT_INPUTS

    def _tensor(self, model_input: Mapping[str, Any], name: str, dims: int) -> torch.Tensor:
        if name not in model_input:
            raise ValueError(f"SSR {self.kind} model input: missing {name!r}; expected keys {list(self.inputs)}")
        array = np.asarray(model_input[name])
        if array.ndim != dims:
            raise ValueError(
                f"SSR {self.kind} model input {name!r}: expected {dims} dimensions, got shape {array.shape}"
            )
        param = next(self.model.parameters())
        return torch.as_tensor(array, dtype=param.dtype, device=param.device)

    @torch.no_grad()
    def predict(self, model_input: Mapping[str, Any], params: dict | None = None) -> np.ndarray:
        if not isinstance(model_input, Mapping):
            raise TypeError(
                f"SSR {self.kind} model input: expected a dict with keys {list(self.inputs)}, "
                f"got {type(model_input).__name__}"
            )
        if self.kind == "fewshot":
            support = self._tensor(model_input, "support", 3)
            query = self._tensor(model_input, "query", 2)
            return self.model.predict(support, query).cpu().numpy().astype(np.int64)
        query = self._tensor(model_input, "query", 2)
        neighbours = self._tensor(model_input, "neighbours", 3)
        positions = torch.arange(neighbours.shape[1], device=neighbours.device).expand(neighbours.shape[:2])
        order, _ = self.model.rerank(query, neighbours, positions)
        return order.cpu().numpy().astype(np.int64)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> SSRPredictor:
    """MLflow's hook: ``data_path`` is the pytorch flavor's data folder of the model."""
    import mlflow.pytorch  # lazy: only when a model is loaded: importing this module stays cheap

    return SSRPredictor(mlflow.pytorch.load_model(os.path.dirname(os.path.abspath(data_path)), map_location="cpu"))


def input_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each input's shape, -1 where any size is accepted (the model signature)."""
    ssr: Any = model.ssr  # the packaged FewShotSSR or RetrievalSSR
    if hasattr(model, "rerank"):
        return {"query": (-1, ssr.feat_dim), "neighbours": (-1, ssr.k, ssr.feat_dim)}
    return {"support": (ssr.n_way, -1, ssr.feat_dim), "query": (-1, ssr.feat_dim)}


def input_example(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """A small seeded input (3 queries; 2 shots), stored with the model as its example."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(
            [3 if d == -1 and i == 0 else 2 if d == -1 else d for i, d in enumerate(shape)]
        ).astype(np.float32)
        for name, shape in input_shapes(model).items()
    }
