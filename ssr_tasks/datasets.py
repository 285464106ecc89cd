"""The dataset registry: one entry per dataset of either track, the paper's and the user's alike.

An entry says what the dataset needs (a ``data_root``, a backbone to embed images, ground
truth), where its validation comes from, and which loader prepares it. The parameter forms
(``ssr_tasks.config``), the flows, the CLI and the reports take the names from here.

Adding a dataset is one entry here plus one loader: few-shot loaders are in
``ssr_tasks.fewshot.tasks`` (``prepare_data`` / ``import_features``), retrieval loaders in
``ssr_tasks.retrieval.tasks`` (``import_features_data``), dispatched on ``Dataset.loader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Dataset:
    """One dataset.

    name: what ``data.dataset`` says; track: "fewshot" or "retrieval"; loader: which loader
    prepares it ("glyphs", "image-folder", "features", "landmarks"); spec: the fixed image
    spec (``storage.fewshot.DATASET_SPECS``) of an image dataset, None when the spec comes
    from the data (``image-folder``) or there are no images; needs_root: ``data_root`` is
    required (``root_hint`` says what it holds); images: a backbone embeds images (False:
    the embeddings are given); ground_truth and validation: what scores it and what chooses
    its settings, for the docs and the form.
    """

    name: str
    track: Literal["fewshot", "retrieval"]
    loader: Literal["glyphs", "image-folder", "features", "landmarks"]
    summary: str
    needs_root: bool = True
    root_hint: str = ""
    images: bool = True
    spec: str | None = None
    ground_truth: str = ""
    validation: str = ""


_FS_VAL = "the val split's episodes, or an episode JSON beside the splits"
_RT_VAL = "held-out training clusters (holdout_fraction)"

DATASETS: tuple[Dataset, ...] = (
    Dataset(
        "glyphs",
        "fewshot",
        "glyphs",
        "the built-in glyphs, rendered from matplotlib's fonts",
        needs_root=False,
        spec="glyphs",
        ground_truth="class labels",
        validation="SIB-format fixed episodes of the val split",
    ),
    Dataset(
        "cifar-fs",
        "fewshot",
        "image-folder",
        "CIFAR-FS in the authors' layout",
        root_hint="{train,val,test}/<class>/<image> (`ssr data download cifar-fs`)",
        spec="cifar-fs",
        ground_truth="class labels",
        validation="the authors' 1,000 fixed episodes when present, else " + _FS_VAL,
    ),
    Dataset(
        "mini-imagenet",
        "fewshot",
        "image-folder",
        "miniImageNet in the authors' layout",
        root_hint="{train,val,test}/<class>/<image> (`ssr data download mini-imagenet`)",
        spec="mini-imagenet",
        ground_truth="class labels",
        validation="the authors' 1,000 fixed episodes when present, else " + _FS_VAL,
    ),
    Dataset(
        "tiered-imagenet",
        "fewshot",
        "image-folder",
        "tieredImageNet in the authors' layout",
        root_hint="{train,val,test}/<class>/<image> (`ssr data download tiered-imagenet`)",
        spec="tiered-imagenet",
        ground_truth="class labels",
        validation="the authors' 1,000 fixed episodes when present, else " + _FS_VAL,
    ),
    Dataset(
        "image-folder",
        "fewshot",
        "image-folder",
        "your images: {train,val,test}/<class>/<image>, any format Pillow reads",
        root_hint="{train,val,test}/<class>/<image>",
        ground_truth="class folders",
        validation=_FS_VAL,
    ),
    Dataset(
        "features",
        "fewshot",
        "features",
        "your embeddings: one Parquet file or a folder of them with columns id, label, split, embedding",
        root_hint="a Parquet file or folder (id, label, split, embedding)",
        images=False,
        ground_truth="labels",
        validation="episodes of the val split",
    ),
    Dataset(
        "glyphs-retrieval",
        "retrieval",
        "glyphs",
        "the built-in glyph retrieval set",
        needs_root=False,
        spec="glyphs",
        ground_truth="revisited easy/hard/junk",
        validation=_RT_VAL,
    ),
    Dataset(
        "roxford5k",
        "retrieval",
        "landmarks",
        "revisited Oxford with the authors' R-GeM features, SSR trained on SfM-120k",
        root_hint="the authors' landmark pickles (`ssr data download ssr-landmark-features`)",
        images=False,
        ground_truth="revisited easy/hard/junk",
        validation=_RT_VAL,
    ),
    Dataset(
        "rparis6k",
        "retrieval",
        "landmarks",
        "revisited Paris with the authors' R-GeM features, SSR trained on SfM-120k",
        root_hint="the authors' landmark pickles (`ssr data download ssr-landmark-features`)",
        images=False,
        ground_truth="revisited easy/hard/junk",
        validation=_RT_VAL,
    ),
    Dataset(
        "features",
        "retrieval",
        "features",
        "your labelled embeddings: train.parquet, queries.parquet, "
        "database.parquet (+ gnd.pkl / gnd.json, else label matches)",
        root_hint="a folder with train.parquet, queries.parquet, database.parquet and optionally gnd.pkl/gnd.json",
        images=False,
        ground_truth="gnd.pkl / gnd.json (revisitop) or label matches",
        validation=_RT_VAL,
    ),
)


def names(track: str) -> tuple[str, ...]:
    """The dataset names of a track, in registry order."""
    return tuple(d.name for d in DATASETS if d.track == track)


def dataset(track: str, name: str) -> Dataset:
    """The entry of ``name`` in ``track``; unknown names are refused with the known ones."""
    for d in DATASETS:
        if d.track == track and d.name == name:
            return d
    raise ValueError(f"dataset: unknown {track} dataset {name!r} (known: {', '.join(names(track))})")


def check_root(track: str, name: str, data_root: str | None) -> None:
    """Refuse a dataset that needs ``data_root`` without one, saying what the folder holds."""
    entry = dataset(track, name)
    if entry.needs_root and not data_root:
        raise ValueError(f"data_root: dataset {name!r} needs data_root: {entry.root_hint}")
