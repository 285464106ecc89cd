"""Parameters of the two pipelines.

These pydantic models are the flow boundary: Prefect renders them as the form of the
``ssr`` flow in the UI, and validates what users type there or pass on the CLI
(``n_way < 2``, ``steps < 1``, a negative learning rate... are refused with the field
named). They are frozen and are logged whole to MLflow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

FewShotDataset = Literal["glyphs", "cifar-fs", "mini-imagenet", "tiered-imagenet"]
BackboneName = Literal["conv4-64", "resnet12", "wrn-28-10"]
Device = Literal["auto", "cpu", "cuda"]


def default_run_dir() -> Path:
    """Folder holding data, checkpoints, features, stores and the MLflow SQLite store.

    ``SSR_HOME`` wins; otherwise ``./runs`` under the current directory (the project root
    for the README commands and for deployments, whose pull step sets the directory).
    """
    return Path(os.environ.get("SSR_HOME") or Path.cwd() / "runs").resolve()


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FewShotParams(_Params):
    """Transductive few-shot reproduction (SSR_METHOD.md sections 3 and 5)."""

    dataset: FewShotDataset = Field("glyphs", description="Built-in glyphs, or a real dataset under data_root")
    data_root: str | None = Field(None, description="Folder with {train,val,test}/<class>/<image> (real datasets)")
    val_episodes_json: str | None = Field(None, description="SIB fixed validation episodes (optional)")
    glyphs_size: Literal["small", "default"] = "default"
    data_seed: int = 0
    backbone: BackboneName = "conv4-64"
    backbone_checkpoint: str | None = Field(None, description="Released backbone state dict; pretrained when empty")
    pretrain_epochs: int = Field(3, ge=1)
    pretrain_batch_size: int = Field(64, ge=2)
    pretrain_lr: PositiveFloat = 0.1
    n_way: int = Field(5, ge=2)
    n_shot_train: int = Field(1, ge=1)
    n_query: int = Field(15, ge=1, description="Queries per class")
    eval_shots: list[int] = Field(default_factory=lambda: [1, 5])
    max_steps: int = Field(3, ge=1, le=8, description="Curriculum 1 -> ... -> max_steps refinement steps")
    hidden: int = Field(256, ge=4, description="DNI hidden width (paper: 4096; 256 keeps CPU runs short)")
    lr_dni_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [0.01, 0.1],
        description="DNI step sizes swept (paper, WRN features: 1e-3, 2e-3, 5e-3); the right scale depends on the features' norms")
    iterations_first: int = Field(600, ge=1, description="Iterations at steps=1 (paper: 30,000)")
    iterations_next: int = Field(200, ge=1, description="Iterations per later step (paper: 10,000)")
    lr_first: PositiveFloat = 0.1
    lr_next: PositiveFloat = 0.01
    batch_episodes: int = Field(4, ge=1)
    val_every: int = Field(100, ge=1)
    n_val_episodes: int = Field(300, ge=1)
    n_test_episodes: int = Field(600, ge=1)
    krecip_k1: list[int] = Field(default_factory=lambda: [10, 20, 30])
    krecip_k2: list[int] = Field(default_factory=lambda: [5, 10, 15])
    krecip_lambda: list[float] = Field(default_factory=lambda: [0.2, 0.5, 0.8])
    n_eval_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present)")
    seed: int = 0
    device: Device = "auto"
    model_name: str = "ssr-fewshot"

    @field_validator("eval_shots")
    @classmethod
    def _shots_positive(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"eval_shots: expected a non-empty list of integers >= 1, got {v}")
        return v

    @field_validator("krecip_lambda")
    @classmethod
    def _lambda_range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"krecip_lambda: expected values in [0, 1], got {v}")
        return v

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
    glyphs_size: Literal["small", "default"] = "default"
    data_seed: int = 0
    backbone: BackboneName = Field("conv4-64", description="Glyphs only (the landmark features are given)")
    backbone_checkpoint: str | None = None
    pretrain_epochs: int = Field(3, ge=1, description="Same as the few-shot default, so both share one backbone")
    k: int = Field(50, ge=2, description="Neighbours re-ranked per query (paper: 100)")
    steps: int = Field(1, ge=1, le=8)
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
    lr: PositiveFloat = 1e-3
    holdout_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of the training clusters held out for validation (seeded hash of the "
        "cluster id); lr_dni, the checkpoint, QE's n and the k-reciprocal point are chosen on them")
    holdout_seed: int = 0
    n_val_queries: int = Field(70, ge=1, description="Held-out queries of the validation mAP")
    qe_n_grid: list[int] = Field(default_factory=lambda: [1, 3, 5, 7, 9], description="Query expansion: top-n items tried")
    krecip_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(40, 20), (80, 40), (160, 80)], description="k-reciprocal (k1, k2) pairs tried")
    krecip_lambda: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5], description="k-reciprocal lambdas tried")
    shard_size: int = Field(1000, ge=1)
    n_rerank_actors: int = Field(0, ge=0, description="0: one per free CPU (GPU when present)")
    seed: int = 0
    device: Device = "auto"
    model_name: str = "ssr-retrieval"

    @field_validator("qe_n_grid")
    @classmethod
    def _qe_grid(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError(f"qe_n_grid: expected a non-empty list of integers >= 1, got {v}")
        return v

    @field_validator("krecip_lambda")
    @classmethod
    def _krecip_lambda(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"krecip_lambda: expected values in [0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _real_dataset_needs_root(self) -> "RetrievalParams":
        if self.dataset != "glyphs-retrieval" and not self.data_root:
            raise ValueError(f"data_root: dataset {self.dataset!r} needs data_root, the folder of the landmark pickles "
                             "(run `ssr data download ssr-landmark-features`)")
        return self
