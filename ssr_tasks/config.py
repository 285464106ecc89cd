"""Parameters of the two pipelines, in groups.

These pydantic models are the flow boundary: Prefect renders them as the form of the
``ssr`` flow in the UI (one section per group), and validates what users type there or
pass on the CLI (``n_way < 2``, ``steps < 1``, a negative learning rate... are refused with
the field named). They are frozen and are logged whole to MLflow.

Each track has the groups ``data``, ``backbone``, ``train``, ``sweep``, ``evaluation`` and
``baselines``. The train group *is* the training config: a Ray Tune trial receives it with
one point of ``sweep`` applied (``apply_point``), and it builds the model. Each task takes
only the groups it reads, so its cache key is those groups. Every value has one default,
here; presets (deploy/prefect.yaml) override groups. The flat names of earlier releases
(``lr_dni_grid``, ``n_shot_train``, ``backbone_checkpoint``...) still load, with a
DeprecationWarning (``regroup``).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ssr_model import FewShotSSR, RetrievalSSR
from ssr_model.baselines import PEER_METHODS, RETRIEVAL_METHODS
from ssr_model.baselines.peers import COMPOSED_METHODS
from ssr_tasks import datasets

FewShotDataset = Literal[datasets.names("fewshot")]  # type: ignore[valid-type]
BackboneName = Literal["conv4-64", "resnet12", "wrn-28-10"]
Device = Literal["auto", "cpu", "cuda"]


def default_run_dir() -> Path:
    """Folder holding data, checkpoints, features, stores and the MLflow SQLite store.

    ``SSR_HOME`` wins; otherwise ``./runs`` under the current directory (the project root
    for the README commands and for deployments, whose pull step sets the directory).
    """
    return Path(os.environ.get("SSR_HOME") or Path.cwd() / "runs").resolve()


FEWSHOT_METHODS = ("baseline", "k-reciprocal", "ssr", *PEER_METHODS, *COMPOSED_METHODS)
# The rows of a run that does not name them: all but the compositions ssr+tim, ssr+pt-map (asked for by name).
DEFAULT_FEWSHOT_METHODS = ("baseline", "k-reciprocal", "ssr", *PEER_METHODS)


def query_balance_alpha(value: str) -> float | None:
    """None for "balanced", ALPHA for "dirichlet:ALPHA"; anything else, or ALPHA <= 0, is refused."""
    if value == "balanced":
        return None
    head, _, tail = value.partition(":")
    try:
        alpha = float(tail) if head == "dirichlet" else math.nan
    except ValueError:
        alpha = math.nan
    if math.isnan(alpha):
        raise ValueError(f"query_balance: expected 'balanced' or 'dirichlet:ALPHA' (e.g. dirichlet:2), got {value!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"query_balance: Dirichlet alpha must be a finite number > 0, got {value!r}")
    return alpha


def _krecip_lambdas(v: list[float]) -> list[float]:
    if not v or any(not 0.0 <= x <= 1.0 for x in v):
        raise ValueError(f"krecip_lambda: expected values in [0, 1], got {v}")
    return v


# The k-reciprocal lambda grid of both pipelines: a non-empty list of values in [0, 1].
KrecipLambdas = Annotated[list[float], AfterValidator(_krecip_lambdas)]


def _positive_ints(v: list[int], info: ValidationInfo) -> list[int]:
    if not v or any(n < 1 for n in v):
        raise ValueError(f"{info.field_name}: expected a non-empty list of integers >= 1, got {v}")
    return v


# A non-empty list of integers >= 1 (shots, QE's n grid).
PositiveInts = Annotated[list[int], AfterValidator(_positive_ints)]


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- the groups both tracks share -----------------------------------------------------------------


class BackboneParams(_Params):
    """The feature extractor: a checkpoint, or pretrained here on the training classes."""

    name: BackboneName = Field("conv4-64", description="Feature extractor (paper: conv4-64, resnet12, wrn-28-10)")
    checkpoint: str | None = Field(
        None,
        description="'released': the authors' backbone for dataset and backbone from `ssr data download "
        "fewshot-backbones` (<data_root>/../backbones); a path: a state dict; empty: pretrained here on the base "
        "classes (paper: released)",
    )
    pretrain_epochs: int = Field(3, ge=1, description="Backbone pretraining epochs (paper: released backbones)")
    pretrain_batch_size: int = Field(64, ge=2, description="Pretraining batch size (paper: released backbones)")
    pretrain_lr: PositiveFloat = Field(0.1, description="Pretraining learning rate (paper: released backbones)")


class FewShotBackboneParams(BackboneParams):
    released_checkpoint: str | None = Field(
        None,
        description="The authors' netSSRBest.pth ({netFeat, SSR, nbStep}): no pretraining, no training; "
        "backbone and SSR come from it and are evaluated with the first point of the sweep (paper: their released "
        "models)",
    )


Sweep = dict[str, list[int | float]]


def sweep_points(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of the grid ``sweep`` (field -> values), fields in sorted order, values in the
    order given: the Cartesian product. ``{}`` has one point, ``{}``."""
    names = sorted(sweep)
    return [dict(zip(names, values)) for values in itertools.product(*(sweep[n] for n in names))]


def _check_sweep(train: BaseModel, sweep: Mapping[str, Sequence[Any]], not_swept: tuple[str, ...]) -> None:
    for name, values in sweep.items():
        if name not in type(train).model_fields or name in not_swept:
            known = ", ".join(n for n in type(train).model_fields if n not in not_swept)
            raise ValueError(f"sweep: {name!r} is not a field of the train group that can be swept (known: {known})")
        if not values or len(set(values)) != len(values):
            raise ValueError(f"sweep: {name} expects a non-empty list without repeats, got {values}")
    for point in sweep_points(sweep):  # each point must be a valid training config
        try:
            type(train).model_validate({**train.model_dump(), **point})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"sweep: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def apply_point(train: TrainT, point: Mapping[str, Any]) -> TrainT:
    """``train`` with the fields of one sweep point replaced, validated (ints stay ints)."""
    return type(train).model_validate({**train.model_dump(), **point})


TrainT = TypeVar("TrainT", bound=BaseModel)


class _Pipeline(_Params):
    """What both tracks' top-level parameters do: flat (pre-group) names still load, and the
    sweep is checked against the train group."""

    FLAT: ClassVar[dict[str, tuple[str, str]]]  # flat name -> (group, field); each pipeline sets its own

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nested, renamed = regroup(data, cls.FLAT)
            if renamed:
                warnings.warn(
                    "flat parameter names are deprecated: " + ", ".join(f"{a} -> {b}" for a, b in renamed),
                    DeprecationWarning,
                    stacklevel=2,
                )
            return nested
        return data

    NOT_SWEPT: ClassVar[tuple[str, ...]] = ("train_augment",)

    @model_validator(mode="after")
    def _sweep_fits_train(self):
        _check_sweep(self.train, self.sweep, self.NOT_SWEPT)
        return self

    @property
    def first_train(self):
        """The train group at the first point of the sweep."""
        return apply_point(self.train, sweep_points(self.sweep)[0])


def regroup(data: Mapping[str, Any], flat: Mapping[str, tuple[str, str]]) -> tuple[dict, list[tuple[str, str]]]:
    """``data`` with the flat names of ``flat`` (name -> (group, field)) moved into their groups;
    also the (old, new) names moved. ``lr_dni_grid`` becomes ``sweep.lr_dni``."""
    out: dict[str, Any] = {}
    renamed = []
    for key, value in data.items():
        if key in flat and not isinstance(value, (Mapping, BaseModel)):  # "backbone" is a flat name and a group
            group, name = flat[key]
            target = out.setdefault(group, {})
            if isinstance(target, BaseModel):
                target = out[group] = target.model_dump()
            target[name] = value
            renamed.append((key, f"{group}.{name}"))
        elif key in out and isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = {**dict(value), **out[key]}
        elif key in out and isinstance(value, BaseModel):
            out[key] = {**value.model_dump(), **out[key]}
        else:
            out[key] = value
    return out, renamed


# ---- few-shot -------------------------------------------------------------------------------------------


class FewShotDataParams(_Params):
    """Where the images come from and how validation episodes are found."""

    dataset: FewShotDataset = Field(  # type: ignore[valid-type]  # Literal built from the registry's names
        "glyphs",
        description="Built-in glyphs; a paper dataset under data_root (cifar-fs, mini-imagenet, "
        "tiered-imagenet); image-folder: your images {train,val,test}/<class>/<image>; features: your embeddings "
        "table, Parquet with id, label, split, embedding (paper: cifar-fs, mini-imagenet, tiered-imagenet)",
    )
    data_root: str | None = Field(
        None,
        description="Folder with {train,val,test}/<class>/<image> (e.g. data/cifar-fs after `ssr data download`), "
        "or for features a Parquet file or folder of them (paper: the authors' layout)",
    )
    image_size: int = Field(
        84, ge=8, description="image-folder: images are resized to this square (paper: fixed per dataset)"
    )
    normalization: str = Field(
        "auto",
        pattern=r"^(auto|imagenet|[-0-9.eE]+(,[-0-9.eE]+)*)$",
        description="image-folder: auto (mean and std of the train split, computed once), imagenet, or 'm,s' / "
        "'m1,m2,m3,s1,s2,s3' on the [0, 1] scale (paper: fixed per dataset)",
    )
    val_episodes_json: str | None = Field(
        None,
        description="Fixed validation episodes (SIB JSON); empty: <data_root>/val1000Episode_<n_way>_way_"
        "<n_shot>_shot_<n_query>_query.json when the folder holds it, else seeded episodes (paper: the "
        "authors' 1,000 episodes)",
    )
    glyphs_size: Literal["small", "default"] = Field("default", description="Built-in dataset size (paper: not used)")
    data_seed: int = Field(0, description="Seed of the built-in dataset (paper: not used)")

    @model_validator(mode="after")
    def _real_dataset_needs_root(self) -> FewShotDataParams:
        datasets.check_root("fewshot", self.dataset, self.data_root)
        return self

    @property
    def entry(self) -> datasets.Dataset:
        return datasets.dataset("fewshot", self.dataset)


@dataclass(frozen=True)
class EpisodeShape:
    """The episodes SSR is trained and validated on: n_way classes, n_shot supports and n_query
    queries per class (the few-shot model's input width depends on n_way and n_query)."""

    n_way: int
    n_shot: int
    n_query: int


class FewShotTrainParams(_Params):
    """The few-shot training config (SSR_METHOD.md section 5): the curriculum 1 -> ... -> max_steps,
    each stage from the previous best. A Ray Tune trial receives it with the sweep's point applied."""

    n_way: int = Field(5, ge=2, description="Classes per episode, training and test (paper: 5)")
    n_shot: int = Field(1, ge=1, description="Shots of training and validation episodes (paper: 1)")
    n_query: int = Field(15, ge=1, description="Queries per class, training and test (paper: 15)")
    hidden: int = Field(256, ge=4, description="DNI hidden width (paper: 4096; 256 keeps CPU runs short)")
    lr_dni: PositiveFloat = Field(
        0.01,
        description="DNI step size when the sweep does not set it; the right scale depends on the features' "
        "norms (paper: 1e-3, 2e-3, 5e-3 swept)",
    )
    max_steps: int = Field(3, ge=1, le=8, description="Curriculum 1 -> ... -> max_steps refinement steps (paper: 4)")
    iterations_first: int = Field(600, ge=1, description="Iterations at steps=1, lr x0.1 after a sixth (paper: 30,000)")
    iterations_next: int = Field(200, ge=1, description="Iterations per later step (paper: 10,000)")
    lr_first: PositiveFloat = Field(0.1, description="SGD learning rate at steps=1 (paper: 0.1, x0.1 at 5,000)")
    lr_next: PositiveFloat = Field(0.01, description="SGD learning rate of later steps (paper: 0.01)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum, Nesterov (paper: 0.9)")
    weight_decay: float = Field(5e-4, ge=0.0, description="SGD weight decay (paper: 5e-4)")
    batch_episodes: int = Field(4, ge=1, description="Episodes per SGD iteration (paper: 1)")
    val_every: int = Field(100, ge=1, description="Iterations between validations (paper: 1,000)")
    patience: int = Field(
        0,
        ge=0,
        description="Stop a curriculum stage after this many validations without a new "
        "best; 0: run every iteration (paper: 0)",
    )
    seed: int = Field(0, description="Seed of episodes and initialisation (paper: 300)")
    train_augment: str = Field(
        "none",
        pattern=r"^(none|online|views:[1-9][0-9]*)$",
        description="Features of training episodes: none (extracted once, test transform), online (augmented images "
        "through the frozen backbone every episode), views:N (N augmented views per image, extracted once) "
        "(paper: online)",
    )
    query_balance: str | list[str] = Field(
        "auto",
        description="Query counts per class of the training and validation episodes, one SSR model per value: "
        "balanced (n_query each), dirichlet:ALPHA (class counts of the n_way x n_query queries from "
        "Dirichlet(ALPHA), as evaluation.query_balance), or a list of them, e.g. [balanced, dirichlet:2]; auto: "
        "balanced, plus evaluation.query_balance when that is Dirichlet, so a Dirichlet run's table has SSR "
        "trained both ways. Each model is registered apart: balanced under model_name, dirichlet:ALPHA under "
        "<model_name>-dirichlet<ALPHA> (paper: balanced)",
    )

    @field_validator("query_balance")
    @classmethod
    def _train_query_balance(cls, v: str | list[str]) -> str | list[str]:
        values = [v] if isinstance(v, str) else list(v)
        if not values or len(set(values)) != len(values):
            raise ValueError(f"query_balance: expected a value or a non-empty list without repeats, got {v}")
        for value in values:
            if value != "auto" or len(values) > 1:
                query_balance_alpha(value)
        return values[0] if len(values) == 1 else values

    @property
    def trained_balance(self) -> str:
        """The query balance this config trains with ("auto": balanced); a list is refused (one per trial)."""
        if not isinstance(self.query_balance, str):
            raise ValueError(f"query_balance: one value per trial, got {self.query_balance}")
        return "balanced" if self.query_balance == "auto" else self.query_balance

    @property
    def episode(self) -> EpisodeShape:
        return EpisodeShape(self.n_way, self.n_shot, self.n_query)

    def build(self, feat_dim: int, steps: int) -> FewShotSSR:
        """The untrained model with ``steps`` refinement steps (the one place its arguments are made)."""
        return FewShotSSR(
            feat_dim, self.n_way, self.n_way * self.n_query, steps, lr_dni=self.lr_dni, hidden=self.hidden
        )

    def stage_schedule(self, steps: int) -> tuple[int, float, int | None]:
        """(iterations, lr, decay iteration) of a stage: lr x0.1 after 1/6 of stage 1 (5k of 30k)."""
        if steps == 1:
            return self.iterations_first, self.lr_first, max(1, self.iterations_first // 6)
        return self.iterations_next, self.lr_next, None

    @property
    def total_iterations(self) -> int:
        return self.iterations_first + (self.max_steps - 1) * self.iterations_next


class FewShotEvalParams(_Params):
    """Validation and test episodes, and the rows of the results table."""

    eval_shots: PositiveInts = Field(
        default_factory=lambda: [1, 5], description="Shots of the test episodes, one table column each (paper: 1 and 5)"
    )
    n_val_episodes: int = Field(300, ge=1, description="Fixed validation episodes used (paper: 1,000)")
    n_test_episodes: int = Field(600, ge=1, description="Random test episodes per shot count (paper: 2,000)")
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FEWSHOT_METHODS),
        description="Rows of the results table, each with its ms and peak memory per episode: baseline, "
        "k-reciprocal, ssr, and the peers simpleshot, bd-cspn, tim, alpha-tim, pt-map, laplacianshot on the same features and "
        "test episodes; also, asked for by name, the compositions ssr+tim and ssr+pt-map (TIM / PT-MAP on the trained "
        "SSR's refined features); SSR is trained and registered whatever the rows (paper: baseline, k-reciprocal, ssr)",
    )
    query_balance: str = Field(
        "balanced",
        description="Test queries per class: balanced (n_query each) or dirichlet:ALPHA, the alpha-TIM "
        "protocol: class counts of the n_way x n_query queries from Dirichlet(ALPHA), 2 their main setting "
        "(paper: balanced)",
    )
    n_eval_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present) (paper: one GPU)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in FEWSHOT_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown method {unknown[0]!r} (known: {', '.join(FEWSHOT_METHODS)})")
        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods: expected a non-empty list without repeats, got {v}")
        return v

    @field_validator("query_balance")
    @classmethod
    def _query_balance(cls, v: str) -> str:
        query_balance_alpha(v)
        return v

    @property
    def dirichlet_alpha(self) -> float | None:
        """alpha of ``query_balance`` "dirichlet:ALPHA", None when balanced."""
        return query_balance_alpha(self.query_balance)


class FewShotBaselineParams(_Params):
    """The grid of the k-reciprocal baseline, chosen on validation episodes."""

    krecip_k1: list[int] = Field(
        default_factory=lambda: [10, 20, 30], description="k-reciprocal k1 grid (paper: 10, 20, 30)"
    )
    krecip_k2: list[int] = Field(
        default_factory=lambda: [5, 10, 15], description="k-reciprocal k2 grid (paper: 5, 10, 15)"
    )
    krecip_lambda: KrecipLambdas = Field(
        default_factory=lambda: [0.2, 0.5, 0.8], description="k-reciprocal lambda grid (paper: 0.2, 0.5, 0.8)"
    )


class FewShotParams(_Pipeline):
    """Transductive few-shot reproduction (SSR_METHOD.md sections 3 and 5), in groups.

    Every description ends with the paper's value; the ``paper-fewshot`` deployment sets
    them all (deploy/prefect.yaml).
    """

    # the test episodes' n_way and n_query shape the model; n_shot may be swept (one model per shot count)
    NOT_SWEPT: ClassVar[tuple[str, ...]] = ("train_augment", "n_way", "n_query", "query_balance")
    FLAT: ClassVar[dict[str, tuple[str, str]]] = {
        **{f: ("data", f) for f in ("dataset", "data_root", "val_episodes_json", "glyphs_size", "data_seed")},
        "backbone": ("backbone", "name"),
        "backbone_checkpoint": ("backbone", "checkpoint"),
        **{
            f: ("backbone", f) for f in ("released_checkpoint", "pretrain_epochs", "pretrain_batch_size", "pretrain_lr")
        },
        "n_shot_train": ("train", "n_shot"),
        "lr_dni_grid": ("sweep", "lr_dni"),
        **{
            f: ("train", f)
            for f in (
                "n_way",
                "n_query",
                "hidden",
                "max_steps",
                "iterations_first",
                "iterations_next",
                "lr_first",
                "lr_next",
                "batch_episodes",
                "val_every",
                "seed",
                "train_augment",
            )
        },
        **{
            f: ("evaluation", f)
            for f in ("eval_shots", "n_val_episodes", "n_test_episodes", "methods", "query_balance", "n_eval_actors")
        },
        **{f: ("baselines", f) for f in ("krecip_k1", "krecip_k2", "krecip_lambda")},
    }

    data: FewShotDataParams = Field(default_factory=FewShotDataParams, description="Data set and validation episodes")
    backbone: FewShotBackboneParams = Field(
        default_factory=FewShotBackboneParams, description="Feature extractor, or the authors' released model"
    )
    train: FewShotTrainParams = Field(
        default_factory=FewShotTrainParams,
        description="SSR training config; each Ray Tune trial gets it with a sweep point",
    )
    sweep: Sweep = Field(
        default_factory=lambda: {"lr_dni": [0.01, 0.1]},
        description="Fields of the train group swept by Ray Tune, one trial per point of their "
        'product, the best on validation wins, e.g. {"lr_dni": [0.01, 0.1], "hidden": [256, 1024]} '
        "(paper: lr_dni 1e-3, 2e-3, 5e-3)",
    )
    evaluation: FewShotEvalParams = Field(default_factory=FewShotEvalParams, description="Test episodes and table rows")
    baselines: FewShotBaselineParams = Field(
        default_factory=FewShotBaselineParams, description="Baselines' grids, chosen on validation episodes"
    )
    from_data: bool = Field(
        False,
        description="Scale the sweep's lr_dni values to the features: each is multiplied "
        "by the mean squared norm of the train split's features, as the DNI update's effect on the "
        "cosines falls as lr_dni / |x|^2 (docs/own-data-ssr.md) (paper: no)",
    )
    device: Device = Field("auto", description="auto: CUDA when Ray sees a GPU (paper: one GPU)")
    model_name: str = Field("ssr-fewshot", description="Registered model name in MLflow (paper: not used)")

    @model_validator(mode="after")
    def _methods_fit_the_episodes(self) -> FewShotParams:
        n_way, n_queries = self.train.n_way, self.train.n_way * self.train.n_query
        for name in self.evaluation.methods:
            peer = COMPOSED_METHODS[name].peer if name in COMPOSED_METHODS else name
            if peer in PEER_METHODS:
                for shot in self.evaluation.eval_shots:
                    try:
                        PEER_METHODS[peer].check(n_way, shot, n_queries)
                    except ValueError as exc:
                        raise ValueError(
                            f"evaluation.methods: {exc} ({n_way}-way {shot}-shot, {n_queries} queries)"
                        ) from None
        return self

    @property
    def training_balances(self) -> list[str]:
        """The query balances SSR is trained with, one model each (``train.query_balance``; "auto":
        balanced, plus ``evaluation.query_balance`` when that is Dirichlet). The first is the
        primary model: the ``ssr`` metrics' and the plots' model."""
        value = self.train.query_balance
        if value == "auto":
            test = self.evaluation.query_balance
            return ["balanced"] if test == "balanced" else ["balanced", test]
        return [value] if isinstance(value, str) else list(value)

    def registered_name(self, query_balance: str) -> str:
        """The registered model of SSR trained with ``query_balance``: ``model_name`` for balanced,
        ``<model_name>-dirichlet<ALPHA>`` for dirichlet:ALPHA: models trained for different query
        balances never compete for one champion."""
        alpha = query_balance_alpha(query_balance)
        return self.model_name if alpha is None else f"{self.model_name}-dirichlet{alpha:g}"


# ---- retrieval ------------------------------------------------------------------------------------------

RetrievalDataset = Literal[datasets.names("retrieval")]  # type: ignore[valid-type]


class RetrievalDataParams(_Params):
    """The test set and the training clusters, and which clusters are held out for validation."""

    dataset: RetrievalDataset = Field(  # type: ignore[valid-type]  # Literal built from the registry's names
        "glyphs-retrieval",
        description="Built-in glyphs; a revisited test set (roxford5k, rparis6k) with SSR "
        "trained on SfM-120k; or features: your labelled embeddings (train, queries, database tables); all but "
        "glyphs need data_root",
    )
    data_root: str | None = Field(
        None,
        description="Folder with the authors' landmark pickles gl18_resnet101_{roxford5k,rparis6k,sfm120k}.pkl "
        "(`ssr data download ssr-landmark-features`), or for features a folder with train.parquet, queries.parquet, "
        "database.parquet and optionally gnd.pkl / gnd.json",
    )
    glyphs_size: Literal["small", "default"] = Field("default", description="Built-in dataset size (paper: not used)")
    data_seed: int = Field(0, description="Seed of the built-in dataset (paper: not used)")
    holdout_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="Share of the training clusters held out for validation (seeded hash of the "
        "cluster id); the sweep's point, the checkpoint, QE's n and the k-reciprocal point are chosen on them",
    )
    holdout_seed: int = Field(0, description="Seed of the hash choosing the held-out clusters (paper: not used)")
    distractors: int = Field(
        0,
        ge=0,
        description="Glyphs only: extra database images rendered from characters that are neither queried nor "
        "trained on, embedded by the same backbone in blocks (a built-in R1M; paper: not used)",
    )
    distractors_path: str | None = Field(
        None,
        description="Published or your features: distractor features (.npy, revisitop .pkl or .parquet; (N, D) or "
        "(D, N); e.g. the revisitop 1M) appended to the test database as `ssr data import-distractors` does "
        "(paper: R1M)",
    )

    @model_validator(mode="after")
    def _real_dataset_needs_root(self) -> RetrievalDataParams:
        datasets.check_root("retrieval", self.dataset, self.data_root)
        return self

    @model_validator(mode="after")
    def _distractors_fit_dataset(self) -> RetrievalDataParams:
        glyphs = self.entry.loader == "glyphs"
        if self.distractors and not glyphs:
            raise ValueError(
                f"distractors: rendered distractors are for the glyphs; for {self.dataset} set distractors_path"
            )
        if self.distractors_path and glyphs:
            raise ValueError("distractors_path: the glyphs render their distractors; set distractors: N instead")
        return self

    @property
    def entry(self) -> datasets.Dataset:
        return datasets.dataset("retrieval", self.dataset)


class RetrievalTrainParams(_Params):
    """The retrieval training config (SSR_METHOD.md sections 4 and 6). A Ray Tune trial receives
    it with the sweep's point applied."""

    k: int = Field(50, ge=2, description="Neighbours re-ranked per query (paper: 100)")
    steps: int = Field(1, ge=1, le=8, description="SSR refinement steps (paper: 1)")
    hidden: int = Field(256, ge=4, description="DNI hidden width (paper: 1024)")
    lr_dni: PositiveFloat = Field(
        1e-3,
        description="DNI step size when the sweep does not set it (paper, GeM "
        "features: 1e-4, 2e-4, 5e-4 swept); the scale depends on the features",
    )
    sequence_length: int = Field(
        1000, ge=2, description="Items drawn uniformly, without replacement, per training sequence"
    )
    min_positives: int = Field(
        2,
        ge=0,
        description="Keep sequences with more than this many positives in the top-k (paper, SfM-120k: 5). "
        "Glyph default 2 (at least 3 positives): the built-in training clusters hold 5-6 renderings",
    )
    max_ap: float = Field(
        0.8, gt=0.0, le=1.0, description="Keep sequences whose initial top-k AP is below this (paper: 0.8)"
    )
    iterations: int = Field(600, ge=1, description="Paper: 60,000")
    val_every: int = Field(
        250, ge=1, description="Validation period; fresh sequences are drawn for each (paper: 1,000)"
    )
    patience: int = Field(
        0,
        ge=0,
        description="Stop after this many validations without a new best, iterations "
        "being then a cap; 0: run every iteration (paper: 0)",
    )
    batch_queries: int = Field(16, ge=1, description="Sequences per SGD step (paper: 1)")
    lr: PositiveFloat = Field(1e-3, description="SGD learning rate (paper: 1e-3)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (paper: 0.9)")
    weight_decay: float = Field(5e-4, ge=0.0, description="SGD weight decay (paper: 5e-4)")
    n_val_queries: int = Field(70, ge=1, description="Held-out queries of the validation mAP")
    val_protocol: Literal["mirror-test", "held-out"] = Field(
        "mirror-test",
        description="Validation set: mirror-test (queries spread over the held-out clusters, one each before any "
        "second; the database padded with items of training clusters as distractors until positives per database "
        "item match the test set's; the baselines' neighbour counts scaled by the validation / test database sizes, "
        "docs/validation.md) or held-out (the held-out clusters only, grids as given)",
    )
    val_database: int = Field(
        0,
        ge=0,
        description="Validation database size (held-out items, then distractors from the training clusters); "
        "0: set from the test set under mirror-test, the held-out items only under held-out",
    )
    seed: int = Field(0, description="Seed of sequences and initialisation (paper: not given)")

    def build(self, feat_dim: int) -> RetrievalSSR:
        """The untrained model (the one place its arguments are made)."""
        return RetrievalSSR(feat_dim, self.k, self.steps, lr_dni=self.lr_dni, hidden=self.hidden)


class RetrievalBaselineParams(_Params):
    """The grids of the baselines, chosen on the validation queries."""

    qe_n_grid: PositiveInts = Field(
        default_factory=lambda: [1, 3, 5, 7, 9], description="Query expansion: top-n items tried"
    )
    krecip_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(40, 20), (80, 40), (160, 80)], description="k-reciprocal (k1, k2) pairs tried"
    )
    krecip_lambda: KrecipLambdas = Field(
        default_factory=lambda: [0.1, 0.3, 0.5], description="k-reciprocal lambdas tried"
    )
    dba_n_grid: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [1, 3, 5, 10],
        min_length=1,
        description="alpha-DBA + alpha-QE: database neighbours n_dba tried, each with every n of qe_n_grid (alpha 3)",
    )
    diffusion_k_grid: PositiveInts = Field(
        default_factory=lambda: [10, 20, 50],
        description="Diffusion: k of the mutual k-NN graph tried (paper: 50; "
        "alpha 0.99, gamma 3, kq 10, shortlist 1,000)",
    )
    gnn_k_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(10, 4), (26, 7), (50, 10)],
        min_length=1,
        description="GNN re-ranking: (k1, k2) pairs tried (authors' code: 26, 7; shortlist 400)",
    )
    superglobal_k_grid: PositiveInts = Field(
        default_factory=lambda: [3, 6, 9], description="SuperGlobal: neighbours K tried (paper: 9; M 400)"
    )
    superglobal_beta_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [0.15, 0.3], min_length=1, description="SuperGlobal: beta tried (paper: 0.15)"
    )
    val_scale_qe: bool = Field(
        False,
        description="Under val_protocol mirror-test, also scale QE's n and alpha-DBA-QE's n_qe / n_dba on validation by "
        "the positives per query (validation / test); off: measured on the glyphs it did not pick better points "
        "(docs/validation.md)",
    )
    val_vs_test: bool = Field(
        True,
        description="Also score every grid point on the test queries, beside its validation mAP (val_vs_test.csv, "
        "for judging the validation; never used for a choice)",
    )
    methods: list[str] = Field(
        default_factory=lambda: list(RETRIEVAL_METHODS),
        description="Rows of the results table, each also followed by SSR: features, AQE, AQEwD, alpha-QE, DQE, "
        "k-reciprocal (paper), and alpha-DBA-QE, diffusion, GNN, SuperGlobal on the same top-K stores; only their "
        "settings are chosen on validation; SSR is trained and registered whatever the rows",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in RETRIEVAL_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown method {unknown[0]!r} (known: {', '.join(RETRIEVAL_METHODS)})")
        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods: expected a non-empty list without repeats, got {v}")
        return v


class RetrievalEvalParams(_Params):
    """The top-K stores and the re-ranking actors."""

    shard_size: int = Field(1000, ge=1, description="Queries per Parquet shard of the top-K stores (paper: not used)")
    n_rerank_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present)")
    n_search_actors: int = Field(
        -1,
        ge=-1,
        description="Candidate searches of the re-rankers (k-reciprocal, alpha-DBA, diffusion, GNN, SuperGlobal; "
        "DQE's negatives), cut into blocks of rows on a pool of Ray actors: -1 a pool only when the Ray cluster has "
        "more than one node, else in the ranking task's own process; 0 one actor per free CPU; N actors",
    )


class RetrievalParams(_Pipeline):
    """Image retrieval reproduction (SSR_METHOD.md sections 4, 6 and 7), in groups."""

    FLAT: ClassVar[dict[str, tuple[str, str]]] = {
        **{
            f: ("data", f)
            for f in ("dataset", "data_root", "glyphs_size", "data_seed", "holdout_fraction", "holdout_seed")
        },
        "backbone": ("backbone", "name"),
        "backbone_checkpoint": ("backbone", "checkpoint"),
        "pretrain_epochs": ("backbone", "pretrain_epochs"),
        "lr_dni_grid": ("sweep", "lr_dni"),
        **{
            f: ("train", f)
            for f in (
                "k",
                "steps",
                "hidden",
                "sequence_length",
                "min_positives",
                "max_ap",
                "iterations",
                "val_every",
                "batch_queries",
                "lr",
                "n_val_queries",
                "seed",
            )
        },
        **{f: ("baselines", f) for f in ("qe_n_grid", "krecip_pairs", "krecip_lambda")},
        **{f: ("evaluation", f) for f in ("shard_size", "n_rerank_actors", "n_search_actors")},
    }

    data: RetrievalDataParams = Field(default_factory=RetrievalDataParams, description="Test set and training clusters")
    backbone: BackboneParams = Field(
        default_factory=BackboneParams,
        description="Glyphs only: the feature extractor (the landmark features are given)",
    )
    train: RetrievalTrainParams = Field(
        default_factory=RetrievalTrainParams,
        description="SSR training config; each Ray Tune trial gets it with a sweep point",
    )
    sweep: Sweep = Field(
        default_factory=lambda: {"lr_dni": [1e-3, 1e-2]},
        description="Fields of the train group swept by Ray Tune (any of them: k, steps, hidden, "
        "lr_dni, ...), one trial per point of their product, the best validation mAP wins "
        "(paper: lr_dni 1e-4, 2e-4, 5e-4)",
    )
    baselines: RetrievalBaselineParams = Field(
        default_factory=RetrievalBaselineParams, description="Baselines' grids, chosen on the validation queries"
    )
    evaluation: RetrievalEvalParams = Field(default_factory=RetrievalEvalParams, description="Stores and actors")
    from_data: bool = Field(
        False,
        description="Choose settings from the training data (docs/own-data-ssr.md): "
        "holdout_fraction sized for k, the lr_dni sweep around lr* measured on the features, "
        "sequence_length and min_positives relaxed until a quarter of the draws pass (paper: no)",
    )
    device: Device = Field("auto", description="auto: CUDA when Ray sees a GPU (paper: one GPU)")
    model_name: str = Field("ssr-retrieval", description="Registered model name in MLflow (paper: not used)")

    @property
    def k_max(self) -> int:
        """The largest k of any trial (the stores and the held-out set must serve it)."""
        return int(max([self.train.k, *self.sweep.get("k", [])]))
