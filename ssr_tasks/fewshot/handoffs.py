"""Typed results the few-shot steps hand each other (paths and scalars, never tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssr_model import FewShotSSR
from ssr_tasks.config import FewShotTrainParams
from ssr_tasks.fewshot.episodes import EpisodeIndices
from ssr_tasks.handoffs import Backbone, Trials
from ssr_tasks.weights import load_weights


@dataclass(frozen=True)
class FewShotData:
    """A dataset root with {train,val,test}/<class>/<image>, and its fixed validation episodes (SIB JSON) if any."""

    root: str
    val_episodes_json: str | None


@dataclass(frozen=True)
class TrainingFeatures:
    """Where SSR training takes episode features from (``train_augment``): ``mode`` "none"
    (the features table), "views" (the table at ``views_path``) or "online" (the images
    under ``data_root`` through ``backbone``)."""

    mode: str
    data_root: str
    backbone: Backbone
    views_path: str | None = None

    def as_inputs(self) -> dict[str, str]:
        """The string inputs a Ray trial reads (``ssr_tasks.fewshot.ray_jobs.fewshot_trial``)."""
        return {
            "augment": self.mode,
            "views": self.views_path or "",
            "data_root": self.data_root,
            "backbone": self.backbone.name,
            "backbone_path": self.backbone.path,
            "spec": self.backbone.spec,
        }


@dataclass(frozen=True)
class ValidationEpisodes:
    """Fixed validation episodes as row indices of the features' val split (``.npz``)."""

    path: str

    def load(self) -> EpisodeIndices:
        return EpisodeIndices.load(Path(self.path))


@dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal re-ranking parameters (k1, k2, lambda)."""

    k1: int
    k2: int
    lam: float

    @property
    def label(self) -> str:
        return f"k1={self.k1}, k2={self.k2}, λ={self.lam}"


@dataclass(frozen=True)
class Validation:
    """One validation of a curriculum stage: mean accuracy (fraction) over the fixed episodes."""

    iteration: int
    loss: float
    val_acc: float


@dataclass(frozen=True)
class Stage:
    """A finished curriculum stage with ``steps`` refinement steps."""

    steps: int
    best_val: float
    best_path: str
    history: tuple[Validation, ...]


@dataclass(frozen=True)
class FewShotModel:
    """Trained SSR weights and what rebuilds the model around them."""

    weights: str
    config: FewShotTrainParams
    feat_dim: int
    steps: int

    def build(self) -> FewShotSSR:
        """The model with the weights loaded (eval mode, CPU); errors name the file and the mismatch."""
        model = self.config.build(self.feat_dim, self.steps)
        c = self.config
        load_weights(
            model,
            self.weights,
            f"FewShotSSR(feat_dim={self.feat_dim}, n_way={c.n_way}, n_query={c.n_way * c.n_query}, "
            f"steps={self.steps}, lr_dni={c.lr_dni}, hidden={c.hidden})",
        )
        return model.eval()


@dataclass(frozen=True)
class ReleasedModel:
    """The authors' ``netSSRBest.pth`` (``source``) unpacked: its backbone, its SSR weights,
    steps (``nbStep``) and DNI hidden width."""

    source: str
    backbone: Backbone
    ssr_path: str
    steps: int
    hidden: int

    def model(self, base: FewShotTrainParams, feat_dim: int) -> FewShotModel:
        """The model to evaluate on features of width ``feat_dim``: ``base`` (episode shape,
        lr_dni) with the released hidden width and steps."""
        config = base.model_copy(update={"hidden": self.hidden, "max_steps": self.steps})
        return FewShotModel(self.ssr_path, config, feat_dim, self.steps)


@dataclass(frozen=True)
class FewShotTrial:
    """One trial of the grid: its config (the sweep's point applied), the point's label
    (``lr_dni=0.1``), the width of the features, the stages, and the best stage."""

    config: FewShotTrainParams
    label: str
    feat_dim: int
    stages: tuple[Stage, ...]
    best_steps: int
    best_val: float
    best_path: str

    @property
    def lr_dni(self) -> float:
        return self.config.lr_dni

    @property
    def model(self) -> FewShotModel:
        return FewShotModel(self.best_path, self.config, self.feat_dim, self.best_steps)

    @classmethod
    def from_summary(cls, config: FewShotTrainParams, label: str, feat_dim: int, summary: dict) -> FewShotTrial:
        """From the summary ``train_curriculum`` wrote (its on-disk JSON)."""
        stages = tuple(
            Stage(
                s["steps"],
                s["best_val"],
                s["best_path"],
                tuple(Validation(h["iteration"], h["loss"], h["val_acc"]) for h in s["history"]),
            )
            for s in summary["stages"]
        )
        return cls(config, label, feat_dim, stages, summary["best_steps"], summary["best_val"], summary["best_path"])


@dataclass(frozen=True)
class MethodCostRow:
    """Cost of one method on the test episodes, measured in the evaluation actors: key as in
    ``ShotResult.accuracies`` ("ssr" for SSR: one call computes every step)."""

    key: str
    ms_per_episode: float
    peak_mib_per_episode: float
    cpu_ms_per_episode: float = float("nan")


@dataclass(frozen=True)
class ShotResult:
    """Per-episode test accuracies (fractions) at ``shot`` shots: Baseline, the chosen
    k-reciprocal, and SSR after each refinement step (index 0: before refining); the peer
    methods by name (``ssr_model.baselines.PEER_METHODS``); each method's cost; the query
    balance of the episodes ("balanced" or "dirichlet:ALPHA") and the share of repeated
    queries it needed (classes with fewer images than their Dirichlet count); the other SSR
    models, by the query balance they were trained with, after each step (``ssr_variants``),
    ``ssr`` being the run's primary model (``FewShotParams.training_balances``' first)."""

    shot: int
    baseline: tuple[float, ...]
    krecip: tuple[float, ...]
    ssr_by_step: tuple[tuple[float, ...], ...]
    peers: tuple[tuple[str, tuple[float, ...]], ...] = ()
    cost: tuple[MethodCostRow, ...] = ()
    query_balance: str = "balanced"
    repeated_queries: float = 0.0
    ssr_variants: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...] = ()

    def accuracies(self) -> dict[str, np.ndarray]:
        """By method name as in tables and metric names: baseline, krecip, ssr_step<s>, then
        the peers (``peer_key``: simpleshot, bd_cspn, tim, pt_map, laplacianshot, ssr_tim,
        ssr_pt_map), then the other SSR models (``ssr_key``: ssr_dirichlet2_step<s>)."""
        out = {"baseline": np.asarray(self.baseline), "krecip": np.asarray(self.krecip)}
        out.update({f"ssr_step{s}": np.asarray(a) for s, a in enumerate(self.ssr_by_step)})
        out.update({peer_key(name): np.asarray(a) for name, a in self.peers})
        for balance, by_step in self.ssr_variants:
            out.update({f"{ssr_key(balance)}_step{s}": np.asarray(a) for s, a in enumerate(by_step)})
        return out

    def costs(self) -> dict[str, MethodCostRow]:
        return {c.key: c for c in self.cost}


def peer_key(name: str) -> str:
    """Metric key of a peer method or composition name (``bd-cspn`` -> ``bd_cspn``, ``ssr+pt-map`` -> ``ssr_pt_map``)."""
    return name.replace("-", "_").replace("+", "_")


def ssr_key(query_balance: str) -> str:
    """Metric and cost key of an SSR model other than the primary, by the query balance it was
    trained with: ``ssr_balanced``, ``ssr_dirichlet2`` (dirichlet:2), ``ssr_dirichlet0_5``."""
    return "ssr_" + query_balance.replace("dirichlet:", "dirichlet").replace(".", "_")


FewShotTrials = Trials[FewShotTrial]  # the grid's trials; ``.best`` by validation score


def trained_for(trials: FewShotTrials, shot: int, base_shot: int, query_balance: str | None = None) -> FewShotTrial:
    """The model a ``shot``-shot test column uses: the best trial (on its own ``shot``-shot
    validation episodes) among those trained at ``shot`` shots (``sweep: {n_shot: [1, 5]}``);
    without one, the best of those trained at ``base_shot`` (the train group's n_shot).
    query_balance: only among the trials trained with that query balance
    (``train.query_balance``; their validation episodes have it too, so only their scores
    compare); None: among all."""
    candidates = [
        t for t in trials.trials if query_balance is None or t.config.trained_balance == query_balance
    ] or list(trials.trials)
    pool = (
        [t for t in candidates if t.config.n_shot == shot]
        or [t for t in candidates if t.config.n_shot == base_shot]
        or candidates
    )
    return max(pool, key=lambda t: t.best_val)
