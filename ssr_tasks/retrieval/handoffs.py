"""Typed results the retrieval steps hand each other (paths and scalars, never tensors)."""
from __future__ import annotations

from dataclasses import dataclass

from ssr_model import RetrievalSSR
from ssr_tasks.retrieval.train import RetrievalTrainConfig
from ssr_tasks.handoffs import Trials
from ssr_tasks.weights import load_weights


@dataclass(frozen=True)
class RetrievalData:
    """The revisited-format test set (``root/test/jpg`` images, ground truth at ``gnd``), its
    training clusters under ``root/train``, and the few-shot root the backbone pretrains on."""

    root: str
    gnd: str
    images: str
    fewshot_root: str


@dataclass(frozen=True)
class RetrievalFeatures:
    """One features table: split 'database' (ids 0..N-1 in imlist order), 'query' (ids N..),
    'train' (cluster labels); D its width."""

    path: str
    dim: int
    n_database: int
    n_queries: int


@dataclass(frozen=True)
class RetrievalModel:
    """Trained retrieval SSR weights and what rebuilds the model around them."""

    weights: str
    config: RetrievalTrainConfig

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    @property
    def k(self) -> int:
        return self.config.k

    def build(self) -> RetrievalSSR:
        """The model with the weights loaded (eval mode, CPU); errors name the file and the mismatch."""
        c = self.config
        model = c.build()
        load_weights(model, self.weights, f"RetrievalSSR(feat_dim={c.feat_dim}, k={c.k}, steps={c.steps}, "
                                          f"lr_dni={c.lr_dni}, hidden={c.hidden})")
        return model.eval()


@dataclass(frozen=True)
class Validation:
    """Validation AP (fraction, within the top-k of the validation sequences) at ``iteration``."""

    iteration: int
    val_ap: float


@dataclass(frozen=True)
class RetrievalTrial:
    """One trial of the grid: its config (``lr_dni`` included), validation history and best weights."""

    config: RetrievalTrainConfig
    best_val: float
    best_path: str
    history: tuple[Validation, ...]

    @property
    def lr_dni(self) -> float:
        return self.config.lr_dni

    @property
    def model(self) -> RetrievalModel:
        return RetrievalModel(self.best_path, self.config)

    @classmethod
    def from_summary(cls, config: RetrievalTrainConfig, summary: dict) -> "RetrievalTrial":
        """From the summary ``train_retrieval`` wrote (its on-disk JSON)."""
        history = tuple(Validation(int(h["iteration"]), float(h["val_ap"])) for h in summary["history"])
        return cls(config, float(summary["best_val"]), summary["best_path"], history)



@dataclass(frozen=True)
class MethodStore:
    """A method's initial top-K store and the query features SSR uses as query nodes (the
    expanded queries for QE methods)."""

    name: str
    topk: str
    queries: str


@dataclass(frozen=True)
class Rankings:
    """Initial rankings of every method: full (Q, N) rankings in ``ranks`` (``.npz``, one array
    per method name), one top-K store per method, and the database table (row = id) the
    re-ranking actors read."""

    ranks: str
    database: str
    methods: tuple[MethodStore, ...]


@dataclass(frozen=True)
class Reranked:
    """A method's store after SSR re-ranking (same schema as its top-K store)."""

    name: str
    store: str


RetrievalTrials = Trials[RetrievalTrial]  # the grid's trials; ``.best`` by validation score
