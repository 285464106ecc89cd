"""Where the features of training episodes come from (``train_augment``).

- ``none``: the features table (test transform), as extracted once;
- ``views:N``: N views of every training image under the training augmentation, extracted
  once into their own features table; each image of an episode takes one view, drawn
  per (seed, iteration);
- ``online``: the authors' way: the episode's images go through the frozen backbone (eval
  mode, no grad) with the training augmentation, drawn per (seed, iteration).

Every source gives the same tensors as ``episodes.gather`` (support (E, n_way, n_shot, D),
query (E, n_way * n_query, D), labels) and is a pure function of (episodes, iteration), so
a resumed training run sees the same episodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ssr_tasks.backbone import dataset_spec
from ssr_tasks.fewshot.episodes import EpisodeIndices, SplitFeatures, gather, query_labels
from ssr_tasks.handoffs import required
from storage.features import read_features, write_features
from storage.fewshot import SplitIndex, list_split, load_images

AUGMENT_PATTERN = r"^(none|online|views:[1-9][0-9]*)$"


@dataclass(frozen=True)
class TrainAugment:
    """``none``, ``online`` or ``views`` with ``n_views`` views per image."""

    mode: str
    n_views: int = 0

    @classmethod
    def parse(cls, text: str) -> TrainAugment:
        if not re.match(AUGMENT_PATTERN, text):
            raise ValueError(f"train_augment: expected none, online or views:N (N >= 1), got {text!r}")
        if text.startswith("views:"):
            return cls("views", int(text.split(":", 1)[1]))
        return cls(text)


class EpisodeFeatures(Protocol):
    """Features of training episodes; ``split`` gives the classes episodes are drawn from."""

    split: SplitFeatures

    def gather(
        self, episodes: EpisodeIndices, iteration: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass
class TableFeatures:
    """``none``: rows of the features table."""

    split: SplitFeatures

    def gather(self, episodes: EpisodeIndices, iteration: int, device):
        return gather(self.split, episodes, device)


@dataclass
class ViewFeatures:
    """``views:N``: views (V, N, D) of the N training images; one view per image per episode."""

    split: SplitFeatures
    views: np.ndarray
    seed: int = 0

    def gather(self, episodes: EpisodeIndices, iteration: int, device):
        V = self.views.shape[0]
        E = len(episodes)
        rng = np.random.default_rng([self.seed, iteration])
        sv = rng.integers(0, V, episodes.support.shape)
        qv = rng.integers(0, V, episodes.query.shape)
        emb = torch.from_numpy(self.views)
        support = emb[torch.from_numpy(sv), torch.from_numpy(episodes.support)]
        query = emb[torch.from_numpy(qv), torch.from_numpy(episodes.query)].reshape(E, -1, emb.shape[-1])
        return support.to(device), query.to(device), query_labels(episodes).to(device)


@dataclass
class OnlineFeatures:
    """``online``: augmented images through the frozen backbone, every episode."""

    split: SplitFeatures
    net: torch.nn.Module
    images: SplitIndex
    dataset: str
    seed: int = 0

    @torch.no_grad()
    def gather(self, episodes: EpisodeIndices, iteration: int, device):
        E, W, S = episodes.support.shape
        rng = np.random.default_rng([self.seed, iteration])
        rows = np.concatenate([episodes.support.reshape(-1), episodes.query.reshape(-1)])
        paths = required(self.split.paths, f"{self.split.source}: image paths (online augmentation)")
        x = load_images(self.images, [paths[i] for i in rows], dataset_spec(self.dataset), rng=rng)
        self.net.eval()
        feats = self.net(torch.from_numpy(x).to(device)).float()
        n_sup = E * W * S
        support = feats[:n_sup].reshape(E, W, S, -1)
        query = feats[n_sup:].reshape(E, -1, feats.shape[-1])
        return support, query, query_labels(episodes).to(device)


@torch.no_grad()
def extract_views(
    data_root: Path,
    dataset: str,
    net: torch.nn.Module,
    n_views: int,
    out_path: Path,
    metadata: dict[str, str],
    seed: int = 0,
    device="cpu",
    batch_size: int = 256,
) -> Path:
    """``n_views`` features of every training image under the training augmentation, in one
    features table: row id ``view * N + i`` for the i-th image of ``list_split(data_root, "train")``."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    index = list_split(Path(data_root), "train")
    spec = dataset_spec(dataset)
    net = net.to(device).eval()
    embs = []
    for v in range(n_views):
        rng = np.random.default_rng([seed, 7, v])
        for start in range(0, len(index.paths), batch_size):
            x = load_images(index, index.paths[start : start + batch_size], spec, rng=rng)
            embs.append(net(torch.from_numpy(x).to(device)).float().cpu().numpy())
    emb = np.concatenate(embs)
    N = len(index.paths)
    write_features(
        out_path,
        ids=np.arange(n_views * N, dtype=np.int64),
        labels=[index.classes[c] for c in index.labels] * n_views,
        splits="train",
        embeddings=emb,
        paths=list(index.paths) * n_views,
        metadata={**metadata, "views": str(n_views)},
    )
    return out_path


def read_views(path: Path, split: SplitFeatures) -> np.ndarray:
    """(V, N, D) views of the N rows of ``split`` from a table written by ``extract_views``."""
    table = read_features(path, split="train", expected_dim=split.dim)
    N = len(split.labels)
    order = np.argsort(table.ids)
    if len(table.ids) % N or not np.array_equal(table.ids[order], np.arange(len(table.ids))):
        raise ValueError(
            f"{path}: expected ids 0..V*{N}-1 (view * {N} + row of the train split), got {len(table.ids)} rows"
        )
    paths = [table.paths[i] for i in order[:N]] if table.paths is not None else None
    if split.paths is not None and paths != split.paths:
        raise ValueError(f"{path}: its images are not those of {split.source} (other order or data set)")
    return np.ascontiguousarray(table.embeddings[order].reshape(-1, N, table.dim))


def training_source(
    augment: TrainAugment,
    train: SplitFeatures,
    seed: int,
    *,
    views_path: str | None = None,
    net: torch.nn.Module | None = None,
    data_root: str | None = None,
    dataset: str | None = None,
    device="cpu",
) -> EpisodeFeatures:
    """The source of training-episode features for ``augment`` (see the module docstring)."""
    if augment.mode == "views":
        return ViewFeatures(train, read_views(Path(required(views_path, "views_path")), train), seed)
    if augment.mode == "online":
        images = list_split(Path(required(data_root, "data_root")), "train")
        if train.paths is not None and list(images.paths) != list(train.paths):
            raise ValueError(f"{images.root}: its images differ from those of {train.source}")
        return OnlineFeatures(train, required(net, "net").to(device).eval(), images, required(dataset, "dataset"), seed)
    return TableFeatures(train)
