"""Typed results that the steps of both tracks hand each other (the per-track ones live in
``ssr_tasks.fewshot.handoffs`` and ``ssr_tasks.retrieval.handoffs``).

They hold file paths and scalars, never tensors: Prefect persists them as task results and
hashes them as the inputs of the next cached task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Generic, Protocol, TypeVar

_V = TypeVar("_V")


def required(value: _V | None, what: str) -> _V:
    """``value``, which the validated parameters guarantee where this is called; a ValueError
    naming ``what`` when it is missing after all."""
    if value is None:
        raise ValueError(f"{what}: missing (required here)")
    return value


@dataclass(frozen=True)
class Backbone:
    """Backbone weights: the state dict at ``path`` of architecture ``name`` for images of
    the dataset spec ``spec`` (``storage.fewshot.DATASET_SPECS``)."""

    path: str
    name: str
    spec: str


@dataclass(frozen=True)
class Features:
    """A features table (``storage.features``) and its embedding width D."""

    path: str
    dim: int


class _Trial(Protocol):
    @property
    def best_val(self) -> float: ...


TrialT = TypeVar("TrialT", bound=_Trial)


@dataclass(frozen=True)
class Trials(Generic[TrialT]):
    """All trials of a grid, in grid order; ``best`` is chosen on validation only."""

    trials: tuple[TrialT, ...]

    @property
    def best(self) -> TrialT:
        return max(self.trials, key=lambda t: t.best_val)


@dataclass(frozen=True)
class TrialTracking:
    """Where the trials of a grid log while they train: the MLflow store, the experiment and
    the parent run their nested runs hang under, and the tags those runs carry."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RegisteredModel:
    """A model version in the MLflow registry, the aliases it took, the run that logged it and the logged model."""

    name: str
    version: int
    model_uri: str
    aliases: tuple[str, ...]
    run_id: str = ""
    tracking_uri: str = ""
    model_id: str = ""  # the MLflow logged model (``models:/<model_id>``) the version points at

    def as_dict(self) -> dict:
        """The flow's output fields (aliases as a list, as before)."""
        return {**asdict(self), "aliases": list(self.aliases)}
