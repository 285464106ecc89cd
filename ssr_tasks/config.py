"""Parameters of the two pipelines.

These pydantic models are the flow boundary: Prefect renders them as the form of the
``ssr`` flow in the UI, and validates what users type there or pass on the CLI
(``n_way < 2``, ``steps < 1``, a negative learning rate... are refused with the field
named). They are frozen and are logged whole to MLflow.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, ValidationInfo, field_validator,
                      model_validator)

from ssr_model.baselines import PEER_METHODS

FewShotDataset = Literal["glyphs", "cifar-fs", "mini-imagenet", "tiered-imagenet"]
BackboneName = Literal["conv4-64", "resnet12", "wrn-28-10"]
Device = Literal["auto", "cpu", "cuda"]


def default_run_dir() -> Path:
    """Folder holding data, checkpoints, features, stores and the MLflow SQLite store.

    ``SSR_HOME`` wins; otherwise ``./runs`` under the current directory (the project root
    for the README commands and for deployments, whose pull step sets the directory).
    """
    return Path(os.environ.get("SSR_HOME") or Path.cwd() / "runs").resolve()


FEWSHOT_METHODS = ("baseline", "k-reciprocal", "ssr", *PEER_METHODS)


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


class FewShotParams(_Params):
    """Transductive few-shot reproduction (SSR_METHOD.md sections 3 and 5).

    Every description ends with the paper's value; the ``paper-fewshot`` deployment sets
    them all (deploy/prefect.yaml).
    """

    dataset: FewShotDataset = Field(
        "glyphs", description="Built-in glyphs, or a real dataset under data_root (paper: cifar-fs, mini-imagenet, "
        "tiered-imagenet)")
    data_root: str | None = Field(
        None, description="Folder with {train,val,test}/<class>/<image>, e.g. data/cifar-fs after `ssr data download` "
        "(paper: the authors' layout)")
    val_episodes_json: str | None = Field(
        None, description="Fixed validation episodes (SIB JSON); empty: <data_root>/val1000Episode_<n_way>_way_"
        "<n_shot_train>_shot_<n_query>_query.json when the folder holds it, else seeded episodes (paper: the "
        "authors' 1,000 episodes)")
    glyphs_size: Literal["small", "default"] = Field("default", description="Built-in dataset size (paper: not used)")
    data_seed: int = Field(0, description="Seed of the built-in dataset (paper: not used)")
    backbone: BackboneName = Field("conv4-64", description="Feature extractor (paper: conv4-64, resnet12, wrn-28-10)")
    backbone_checkpoint: str | None = Field(
        None, description="'released': the authors' backbone for dataset and backbone from `ssr data download "
        "fewshot-backbones` (<data_root>/../backbones); a path: a state dict; empty: pretrained here on the base "
        "classes (paper: released)")
    released_checkpoint: str | None = Field(
        None, description="The authors' netSSRBest.pth ({netFeat, SSR, nbStep}): no pretraining, no training; "
        "backbone and SSR come from it and are evaluated (paper: their released models)")
    train_augment: str = Field(
        "none", pattern=r"^(none|online|views:[1-9][0-9]*)$",
        description="Features of training episodes: none (extracted once, test transform), online (augmented images "
        "through the frozen backbone every episode), views:N (N augmented views per image, extracted once) "
        "(paper: online)")
    pretrain_epochs: int = Field(3, ge=1, description="Backbone pretraining epochs (paper: released backbones)")
    pretrain_batch_size: int = Field(64, ge=2, description="Pretraining batch size (paper: released backbones)")
    pretrain_lr: PositiveFloat = Field(0.1, description="Pretraining learning rate (paper: released backbones)")
    n_way: int = Field(5, ge=2, description="Classes per episode (paper: 5)")
    n_shot_train: int = Field(1, ge=1, description="Shots of training and validation episodes (paper: 1)")
    n_query: int = Field(15, ge=1, description="Queries per class (paper: 15)")
    eval_shots: PositiveInts = Field(default_factory=lambda: [1, 5],
                                  description="Shots of the test episodes, one table column each (paper: 1 and 5)")
    max_steps: int = Field(3, ge=1, le=8, description="Curriculum 1 -> ... -> max_steps refinement steps (paper: 4)")
    hidden: int = Field(256, ge=4, description="DNI hidden width (paper: 4096; 256 keeps CPU runs short)")
    lr_dni_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [0.01, 0.1],
        description="DNI step sizes swept; with released_checkpoint the first is the one it runs with; the right "
        "scale depends on the features' norms (paper: 1e-3, 2e-3, 5e-3)")
    iterations_first: int = Field(600, ge=1, description="Iterations at steps=1, lr x0.1 after a sixth (paper: 30,000)")
    iterations_next: int = Field(200, ge=1, description="Iterations per later step (paper: 10,000)")
    lr_first: PositiveFloat = Field(0.1, description="SGD learning rate at steps=1 (paper: 0.1, x0.1 at 5,000)")
    lr_next: PositiveFloat = Field(0.01, description="SGD learning rate of later steps (paper: 0.01)")
    batch_episodes: int = Field(4, ge=1, description="Episodes per SGD iteration (paper: 1)")
    val_every: int = Field(100, ge=1, description="Iterations between validations (paper: 1,000)")
    n_val_episodes: int = Field(300, ge=1, description="Fixed validation episodes used (paper: 1,000)")
    n_test_episodes: int = Field(600, ge=1, description="Random test episodes per shot count (paper: 2,000)")
    methods: list[str] = Field(
        default_factory=lambda: list(FEWSHOT_METHODS),
        description="Rows of the results table, each with its ms and peak memory per episode: baseline, "
        "k-reciprocal, ssr, and the peers simpleshot, bd-cspn, tim, pt-map, laplacianshot on the same features and "
        "test episodes; SSR is trained and registered whatever the rows (paper: baseline, k-reciprocal, ssr)")
    query_balance: str = Field(
        "balanced", description="Test queries per class: balanced (n_query each) or dirichlet:ALPHA, the alpha-TIM "
        "protocol: class counts of the n_way x n_query queries from Dirichlet(ALPHA), 2 their main setting "
        "(paper: balanced)")
    krecip_k1: list[int] = Field(default_factory=lambda: [10, 20, 30], description="k-reciprocal k1 grid (paper: 10, 20, 30)")
    krecip_k2: list[int] = Field(default_factory=lambda: [5, 10, 15], description="k-reciprocal k2 grid (paper: 5, 10, 15)")
    krecip_lambda: KrecipLambdas = Field(default_factory=lambda: [0.2, 0.5, 0.8],
                                         description="k-reciprocal lambda grid (paper: 0.2, 0.5, 0.8)")
    n_eval_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present) (paper: one GPU)")
    seed: int = Field(0, description="Seed of episodes and initialisation (paper: 300)")
    device: Device = Field("auto", description="auto: CUDA when Ray sees a GPU (paper: one GPU)")
    model_name: str = Field("ssr-fewshot", description="Registered model name in MLflow (paper: not used)")

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

    @model_validator(mode="after")
    def _methods_fit_the_episodes(self) -> "FewShotParams":
        for name in self.methods:
            if name in PEER_METHODS:
                for shot in self.eval_shots:
                    try:
                        PEER_METHODS[name].check(self.n_way, shot, self.n_way * self.n_query)
                    except ValueError as exc:
                        raise ValueError(f"methods: {exc} ({self.n_way}-way {shot}-shot, {self.n_way * self.n_query} "
                                         f"queries)") from None
        return self

    @model_validator(mode="after")
    def _real_dataset_needs_root(self) -> "FewShotParams":
        if self.dataset != "glyphs" and not self.data_root:
            raise ValueError(f"data_root: dataset {self.dataset!r} needs data_root (run `ssr data download`)")
        return self


RetrievalDataset = Literal["glyphs-retrieval", "roxford5k", "rparis6k"]


class RetrievalParams(_Params):
    """Image retrieval reproduction (SSR_METHOD.md sections 4, 6 and 7)."""

    dataset: RetrievalDataset = Field(
        "glyphs-retrieval", description="Built-in glyphs, or a revisited test set (roxford5k, rparis6k) with SSR "
        "trained on SfM-120k; those need data_root")
    data_root: str | None = Field(
        None, description="Folder with the authors' landmark pickles gl18_resnet101_{roxford5k,rparis6k,sfm120k}.pkl "
        "(`ssr data download ssr-landmark-features`)")
    glyphs_size: Literal["small", "default"] = Field("default", description="Built-in dataset size (paper: not used)")
    data_seed: int = Field(0, description="Seed of the built-in dataset (paper: not used)")
    backbone: BackboneName = Field("conv4-64", description="Glyphs only (the landmark features are given)")
    backbone_checkpoint: str | None = Field(
        None, description="Glyphs: a backbone state dict; pretrained on the training clusters when empty "
        "(paper: ResNet-101 GeM, features given)")
    pretrain_epochs: int = Field(3, ge=1, description="Same as the few-shot default, so both share one backbone")
    k: int = Field(50, ge=2, description="Neighbours re-ranked per query (paper: 100)")
    steps: int = Field(1, ge=1, le=8, description="SSR refinement steps (paper: 1)")
    hidden: int = Field(256, ge=4, description="DNI hidden width (paper: 1024)")
    lr_dni_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [1e-3, 1e-2],
        description="DNI step sizes swept (paper, GeM features: 1e-4, 2e-4, 5e-4); the scale depends on the features")
    sequence_length: int = Field(1000, ge=2, description="Items drawn uniformly, without replacement, per training sequence")
    min_positives: int = Field(
        2, ge=0, description="Keep sequences with more than this many positives in the top-k (paper, SfM-120k: 5). "
        "Glyph default 2 (at least 3 positives, the value used so far): the built-in training clusters hold 5-6 renderings")
    max_ap: float = Field(0.8, gt=0.0, le=1.0, description="Keep sequences whose initial top-k AP is below this (paper: 0.8)")
    iterations: int = Field(600, ge=1, description="Paper: 60,000")
    val_every: int = Field(250, ge=1, description="Validation period; fresh sequences are drawn for each (paper: 1,000)")
    batch_queries: int = Field(16, ge=1, description="Sequences per SGD step (paper: 1)")
    lr: PositiveFloat = Field(1e-3, description="SGD learning rate, momentum 0.9, weight decay 5e-4 (paper: 1e-3)")
    holdout_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of the training clusters held out for validation (seeded hash of the "
        "cluster id); lr_dni, the checkpoint, QE's n and the k-reciprocal point are chosen on them")
    holdout_seed: int = Field(0, description="Seed of the hash choosing the held-out clusters (paper: not used)")
    n_val_queries: int = Field(70, ge=1, description="Held-out queries of the validation mAP")
    qe_n_grid: PositiveInts = Field(default_factory=lambda: [1, 3, 5, 7, 9], description="Query expansion: top-n items tried")
    krecip_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(40, 20), (80, 40), (160, 80)], description="k-reciprocal (k1, k2) pairs tried")
    krecip_lambda: KrecipLambdas = Field(default_factory=lambda: [0.1, 0.3, 0.5], description="k-reciprocal lambdas tried")
    shard_size: int = Field(1000, ge=1, description="Queries per Parquet shard of the top-K stores (paper: not used)")
    n_rerank_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present)")
    seed: int = Field(0, description="Seed of sequences and initialisation (paper: not given)")
    device: Device = Field("auto", description="auto: CUDA when Ray sees a GPU (paper: one GPU)")
    model_name: str = Field("ssr-retrieval", description="Registered model name in MLflow (paper: not used)")

    @model_validator(mode="after")
    def _real_dataset_needs_root(self) -> "RetrievalParams":
        if self.dataset != "glyphs-retrieval" and not self.data_root:
            raise ValueError(f"data_root: dataset {self.dataset!r} needs data_root, the folder of the landmark pickles "
                             "(run `ssr data download ssr-landmark-features`)")
        return self
