"""Typed results the retrieval steps hand each other (paths and scalars, never tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssr_model import RetrievalSSR
from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.handoffs import Trials
from ssr_tasks.registry import load_registered_model
from ssr_tasks.retrieval.evaluate import BaselineChoice
from ssr_tasks.weights import load_weights


@dataclass(frozen=True)
class RetrievalData:
    """A revisited-format test set and its training data.

    Built-in glyphs: images under ``images`` (``root/test/jpg``), ground truth at ``gnd``,
    training clusters under ``root/train``, and the few-shot root the backbone pretrains on.
    Published features (rOxford5k / rParis6k + SfM-120k): no images; the features tables
    ``database`` and ``queries`` of the test set, and ``train`` (SfM-120k, split ``train`` /
    ``val`` = held-out clusters), imported from the authors' pickles under ``root``.
    """

    root: str
    gnd: str
    images: str | None = None
    fewshot_root: str | None = None
    database: str | None = None
    queries: str | None = None
    train: str | None = None

    @property
    def needs_backbone(self) -> bool:
        """Images to embed (glyphs) rather than published features."""
        return self.database is None


@dataclass(frozen=True)
class RetrievalFeatures:
    """The test features table ``path``: split 'database' (ids 0..N-1 in imlist order),
    'query' (ids N..); the training table ``train_path``: split 'train' and 'val' (held-out
    clusters), label = cluster (the same file for the built-in glyphs); D their width."""

    path: str
    dim: int
    n_database: int
    n_queries: int
    train_path: str
    gnd: str | None = None  # the test set's ground truth (the validation mirrors its profile)


@dataclass(frozen=True)
class RetrievalModel:
    """Trained retrieval SSR weights and what rebuilds the model around them."""

    weights: str
    config: RetrievalTrainParams
    feat_dim: int

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def name(self) -> str:
        return Path(self.weights).name

    def build(self) -> RetrievalSSR:
        """The model with the weights loaded (eval mode, CPU); errors name the file and the mismatch."""
        c = self.config
        model = c.build(self.feat_dim)
        load_weights(
            model,
            self.weights,
            f"RetrievalSSR(feat_dim={self.feat_dim}, k={c.k}, steps={c.steps}, lr_dni={c.lr_dni}, hidden={c.hidden})",
        )
        return model.eval()


@dataclass(frozen=True)
class RegisteredRetrievalModel:
    """A retrieval model in the MLflow registry (``models:/name@alias`` or ``models:/name/version``),
    the tracking URI that serves it, and its k and D (read once by the driver)."""

    uri: str
    tracking_uri: str
    k: int
    feat_dim: int

    @property
    def name(self) -> str:
        return self.uri

    def build(self) -> RetrievalSSR:
        """The registered model's RetrievalSSR (eval mode, CPU), loaded from the registry."""
        return load_registered_model(self.uri, self.tracking_uri).ssr.eval()


@dataclass(frozen=True)
class Validation:
    """Validation mAP (fraction; medium protocol, held-out queries, top-k re-ranked) at ``iteration``."""

    iteration: int
    val_map: float


@dataclass(frozen=True)
class RetrievalTrial:
    """One trial of the grid: its config (the sweep's point applied), the point's label, the
    width of the features, validation history and best weights."""

    config: RetrievalTrainParams
    label: str
    feat_dim: int
    best_val: float
    best_path: str
    history: tuple[Validation, ...]
    best_iteration: int = 0

    @property
    def lr_dni(self) -> float:
        return self.config.lr_dni

    @property
    def model(self) -> RetrievalModel:
        return RetrievalModel(self.best_path, self.config, self.feat_dim)

    @classmethod
    def from_summary(cls, config: RetrievalTrainParams, label: str, feat_dim: int, summary: dict) -> RetrievalTrial:
        """From the summary ``train_retrieval`` wrote (its on-disk JSON)."""
        history = tuple(Validation(int(h["iteration"]), float(h["val_map"])) for h in summary["history"])
        return cls(
            config,
            label,
            feat_dim,
            float(summary["best_val"]),
            summary["best_path"],
            history,
            int(summary["best_iteration"]),
        )


@dataclass(frozen=True)
class MethodStore:
    """A method's initial top-K store and the query features SSR uses as query nodes (the
    expanded queries for QE methods)."""

    name: str
    topk: str
    queries: str


@dataclass(frozen=True)
class Rankings:
    """Initial rankings of every method: full (Q, N) rankings in the folder ``ranks`` (one
    int32 ``<method>.npy`` per method, read memory-mapped by ``evaluate.read_ranks``), one
    top-K store per method, the database (``database.npy``: L2-normalised rows, row = id,
    memory-mapped by the re-ranking actors), and the baseline settings chosen on validation."""

    ranks: str
    database: str
    methods: tuple[MethodStore, ...]
    choice: BaselineChoice
    val_vs_test: str | None = None  # CSV: every grid point's validation and test mAP
    costs: tuple[RetrievalCost, ...] = ()  # each method's initial ranking, measured in the ranking actor
    features: str | None = None  # the test features table (splits query and database) the costs were measured on


@dataclass(frozen=True)
class RetrievalCost:
    """What one call of a method cost on all ``n_queries`` test queries, measured in a Ray actor:
    wall ms per query, CPU seconds of the call, and its peak MiB (``ssr_tasks.costs``)."""

    name: str
    ms_per_query: float
    peak_mib: float
    cpu_seconds: float
    n_queries: int


@dataclass(frozen=True)
class Reranked:
    """A method's store after SSR re-ranking (same schema as its top-K store). ssr_costs: SSR's
    re-ranking of each method's top-k ("<method> + SSR"), measured in one actor by the task of
    the first method (empty on the others)."""

    name: str
    store: str
    ssr_costs: tuple[RetrievalCost, ...] = ()


RetrievalTrials = Trials[RetrievalTrial]  # the grid's trials; ``.best`` by validation score
