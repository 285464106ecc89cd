"""Few-shot episodes over extracted features (plain numpy/torch, no services).

A split's features are grouped by class; an episode is index arrays into that split:
``support_idx`` (n_way, n_shot) and ``query_idx`` (n_way, n_query). Queries are laid out
class-major, so the query labels of an episode are ``repeat(arange(n_way), n_query)``.
Imbalanced test episodes (``sample_dirichlet_episodes``) carry their query labels instead:
``query_idx`` (n_query_total,) and ``query_labels`` (n_query_total,).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.features import read_features
from storage.fewshot import SplitIndex, read_episode_json


@dataclass(frozen=True)
class SplitFeatures:
    """Features of one split. embeddings (N, D) float32; labels (N,) int64 class index."""

    embeddings: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str] | None
    source: str = ""  # "<features file>, split <name>", for error messages

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def class_members(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.labels == c) for c in range(len(self.classes))]


def load_split(features_path: Path, split: str, expected_dim: int | None = None) -> SplitFeatures:
    """The rows of ``split`` grouped into classes (labels are indices into sorted class names)."""
    table = read_features(Path(features_path), split=split, expected_dim=expected_dim)
    if len(table.ids) == 0:
        raise ValueError(f"{features_path}: split {split!r} is empty (expected images of that split)")
    names = np.asarray([str(x) for x in table.labels])
    classes, labels = np.unique(names, return_inverse=True)
    paths = [str(p) for p in table.paths] if table.paths is not None else None
    emb = table.embeddings.astype(np.float32, copy=False)
    if not emb.flags.writeable:  # Arrow-backed buffers are read-only; torch wants writable memory
        emb = emb.copy()
    return SplitFeatures(emb, labels.astype(np.int64), list(classes), paths, f"{features_path}, split {split!r}")


@dataclass(frozen=True)
class EpisodeIndices:
    """support (E, n_way, n_shot) and query (E, n_way, n_query) row indices of a split.

    With ``query_labels`` (E, n_query_total), class indices 0..n_way-1, the query set has
    any class counts and ``query`` is (E, n_query_total) (imbalanced test episodes).
    """

    support: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.support.shape[0])

    def chunk(self, start: int, stop: int) -> EpisodeIndices:
        labels = None if self.query_labels is None else self.query_labels[start:stop]
        return EpisodeIndices(self.support[start:stop], self.query[start:stop], labels)

    def save(self, path: Path) -> Path:
        """Write as ``.npz`` (arrays ``support``, ``query`` and, if any, ``query_labels``), atomically."""
        path = Path(path)
        tmp = path.with_suffix(".tmp.npz")
        extra = {} if self.query_labels is None else {"query_labels": self.query_labels}
        np.savez(tmp, support=self.support, query=self.query, **extra)  # type: ignore[arg-type]  # numpy stub: **arrays vs allow_pickle
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> EpisodeIndices:
        with np.load(path) as arrays:
            return cls(arrays["support"], arrays["query"], arrays["query_labels"] if "query_labels" in arrays else None)


def sample_episodes(
    split: SplitFeatures, n_episodes: int, n_way: int, n_shot: int, n_query: int, seed: int
) -> EpisodeIndices:
    """Random episodes, deterministic for a seed; refuses splits that are too small."""
    members = split.class_members()
    need = n_shot + n_query
    eligible = [c for c, m in enumerate(members) if len(m) >= need]
    if len(eligible) < n_way:
        small = [(split.classes[c], len(m)) for c, m in enumerate(members) if len(m) < need][:3]
        raise ValueError(
            f"{split.source or 'features'}: split has {len(eligible)} classes with >= {need} images (n_shot {n_shot} + n_query {n_query}), "
            f"need n_way={n_way}; e.g. too small: {small}"
        )
    rng = np.random.default_rng(seed)
    support = np.empty((n_episodes, n_way, n_shot), np.int64)
    query = np.empty((n_episodes, n_way, n_query), np.int64)
    for e in range(n_episodes):
        classes = rng.choice(eligible, size=n_way, replace=False)
        for w, c in enumerate(classes):
            pick = rng.choice(members[c], size=need, replace=False)
            support[e, w], query[e, w] = pick[:n_shot], pick[n_shot:]
    return EpisodeIndices(support, query)


def dirichlet_counts(alpha: float, n_way: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """Query counts per class (n_way,) summing to ``total``: proportions from Dirichlet(alpha, ..., alpha)
    (the alpha-TIM protocol), rounded by largest remainders so the total is exact."""
    if not alpha > 0:
        raise ValueError(f"query_balance: Dirichlet alpha must be > 0, got {alpha}")
    share = rng.dirichlet(np.full(n_way, float(alpha))) * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]] += 1
    return counts


def sample_dirichlet_episodes(
    split: SplitFeatures, n_episodes: int, n_way: int, n_shot: int, n_query_total: int, alpha: float, seed: int
) -> EpisodeIndices:
    """Test episodes with imbalanced queries (alpha-TIM): per episode, class counts of the
    ``n_query_total`` queries from ``dirichlet_counts``; deterministic for a seed.

    A class's queries are drawn without replacement from its images left after the support;
    when its count exceeds them (small classes, e.g. the built-in glyphs' 20 images), every
    image is used and the rest are drawn again from them (repeated queries). Returns
    ``EpisodeIndices`` with ``query`` (E, n_query_total) and ``query_labels``; queries are in
    class order inside an episode.
    """
    members = split.class_members()
    eligible = [c for c, m in enumerate(members) if len(m) > n_shot]
    if len(eligible) < n_way:
        raise ValueError(
            f"{split.source or 'features'}: split has {len(eligible)} classes with > {n_shot} images, "
            f"need n_way={n_way} for imbalanced episodes"
        )
    rng = np.random.default_rng(seed)
    support = np.empty((n_episodes, n_way, n_shot), np.int64)
    query = np.empty((n_episodes, n_query_total), np.int64)
    labels = np.empty((n_episodes, n_query_total), np.int64)
    for e in range(n_episodes):
        counts = dirichlet_counts(alpha, n_way, n_query_total, rng)
        classes = rng.choice(eligible, size=n_way, replace=False)
        rows = []
        for w, c in enumerate(classes):
            pick = rng.permutation(members[c])
            support[e, w], rest = pick[:n_shot], pick[n_shot:]
            extra = rng.choice(rest, size=max(0, counts[w] - len(rest)), replace=True)
            rows.append(np.concatenate([rest[: counts[w]], extra]))
        query[e] = np.concatenate(rows)
        labels[e] = np.repeat(np.arange(n_way), counts)
    return EpisodeIndices(support, query, labels)


def sample_balanced_or_dirichlet(
    split: SplitFeatures, n_episodes: int, n_way: int, n_shot: int, n_query: int, alpha: float | None, seed: int
) -> EpisodeIndices:
    """Episodes of n_way x n_query queries: ``n_query`` per class when ``alpha`` is None
    (``sample_episodes``), else class counts from Dirichlet(alpha) (``sample_dirichlet_episodes``),
    as the test episodes of a ``query_balance``; training and validation episodes draw theirs so."""
    if alpha is None:
        return sample_episodes(split, n_episodes, n_way, n_shot, n_query, seed)
    return sample_dirichlet_episodes(split, n_episodes, n_way, n_shot, n_way * n_query, alpha, seed)


def query_labels(episodes: EpisodeIndices) -> torch.Tensor:
    """Class index of each query, (E, n_query_total): ``query_labels``, or class-major for balanced episodes."""
    if episodes.query_labels is not None:
        return torch.from_numpy(episodes.query_labels)
    E, W, Q = episodes.query.shape
    return torch.arange(W).repeat_interleave(Q).expand(E, W * Q)


def repeated_query_fraction(episodes: EpisodeIndices) -> float:
    """Share of queries that repeat an earlier query of the same episode (0 for balanced episodes)."""
    flat = episodes.query.reshape(len(episodes), -1)
    return float(np.mean([1 - len(np.unique(row)) / len(row) for row in flat])) if len(flat) else 0.0


def fixed_episodes(split: SplitFeatures, json_path: Path, limit: int | None = None) -> EpisodeIndices:
    """SIB fixed episodes (``storage.fewshot.read_episode_json``, the first ``limit`` of them)
    as rows of ``split``, matched on the features table's ``path`` column: support
    (E, n_way, n_shot), query (E, n_way, n_query); every episode must have the same shape."""
    if split.paths is None:
        raise ValueError(f"{json_path}: the features table has no 'path' column to match episodes against")
    # The features table's rows stand in for the split folder; no image is opened.
    rows = SplitIndex(Path(json_path).parent, split.paths, split.labels, split.classes)
    episodes = read_episode_json(json_path, rows, limit=limit or None, source=split.source or "the features table")
    shapes = [f"{ep.support.shape[0]}-way {ep.support.shape[1]}-shot {ep.query.shape[1]}-query" for ep in episodes]
    for e, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"{json_path}: episode {e} is {shape}, episode 0 {shapes[0]} (expected the same n_way, "
                "n_shot and n_query in every episode)"
            )
    return EpisodeIndices(np.stack([ep.support for ep in episodes]), np.stack([ep.query for ep in episodes]))


def gather(split: SplitFeatures, episodes: EpisodeIndices, device: torch.device | str = "cpu"):
    """Tensors for a batch: support (E, n_way, n_shot, D), query (E, n_way*n_query, D), labels (E, n_way*n_query)
    (with ``query_labels``: query (E, n_query_total, D) and those labels)."""
    emb = torch.from_numpy(split.embeddings)
    support = emb[torch.from_numpy(episodes.support)]
    query = emb[torch.from_numpy(episodes.query)].reshape(len(episodes), -1, emb.shape[1])
    return support.to(device), query.to(device), query_labels(episodes).to(device)
