"""Retrieval settings chosen from the training data (docs/own-data-ssr.md, issue 19 item 8).

Measured on data with few, small clusters (235 classes of 10-20 items, D = 256, 25% mAP):
the demo settings let validation choose the untrained model although SSR had learned,
because the held-out set was too small for k, lr_dni was small against the spread of the
top-k similarities, and 600 iterations were short. ``RetrievalParams.from_data`` applies:

- ``holdout_fraction_for_k``: hold out enough clusters that the validation database is
  at least 4k items and at least 20 clusters;
- ``scaled_lr_dni``: an lr_dni grid around ``lr* = spread / slope``, where the first DNI
  update of the untrained model moves the query-neighbour cosines by one spread of a
  query's top-k cosines;
- ``relaxed_sequence_filter``: longer sequences and a lower ``min_positives`` until a
  quarter of the draws pass the filter with about 10 positives per draw;
- and the train group's ``patience`` stops training when validation stops improving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ssr_model import RetrievalSSR
from ssr_model.baselines import KReciprocalPoint, ShortlistPoint
from ssr_tasks.retrieval.train import topk_ap


def _probe_sequences(emb: np.ndarray, k: int, n_probe: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_probe`` random query rows and their top-k rows (by cosine, self excluded)."""
    rng = np.random.default_rng(seed)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    q = rng.choice(len(emb), size=min(n_probe, len(emb)), replace=False)
    sims = unit[q] @ unit.T
    sims[np.arange(len(q)), q] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return q, top


def first_update_slope(
    train_embeddings: np.ndarray, k: int, hidden: int, n_probe: int = 64, seed: int = 0
) -> tuple[float, float, float]:
    """(slope, spread, mean squared norm) at initialisation.

    slope: mean |change of the query-neighbour cosines| made by the first DNI update of an
    untrained model, per unit of lr_dni (measured in the linear regime). spread: mean std of
    the initial top-k cosines of a query. Both on ``n_probe`` queries of the training rows as
    the model will receive them (the product L2-normalises them; pass them as they are fed)."""
    q, top = _probe_sequences(train_embeddings, k, n_probe, seed)
    x = torch.from_numpy(np.ascontiguousarray(train_embeddings, dtype=np.float32))
    sq_norm = float((x * x).sum(1).mean())
    torch.manual_seed(seed)
    model = RetrievalSSR(x.shape[1], k, 1, lr_dni=1e-4 * sq_norm, hidden=hidden).eval()
    with torch.no_grad():
        sims = model(x[torch.from_numpy(q)], x[torch.from_numpy(top)], return_all_steps=True)
    slope = float((sims[1] - sims[0]).abs().mean()) / model.lr_dni
    spread = float(sims[0].std(dim=1).mean())
    return slope, spread, sq_norm


def scaled_lr_dni(
    train_embeddings: np.ndarray,
    k: int = 50,
    hidden: int = 256,
    target: float = 1.0,
    factors: Sequence[float] = (0.3, 1.0, 3.0),
    n_probe: int = 64,
    seed: int = 0,
) -> list[float]:
    """lr_dni grid scaled to the features: ``lr* = target * spread / slope`` times ``factors``.

    Inputs: ``train_embeddings`` (N, D), the training rows exactly as the model receives them
    (L2-normalised in the product; raw CNN outputs if a caller skips normalising); ``k`` and
    ``hidden`` of the model to be trained (the slope grows with both); ``target``: how far
    the first update of the untrained model moves the query-neighbour cosines, in units of
    the spread (std) of a query's initial top-k cosines; ``factors``: the grid around lr*.

    ``slope`` (|d cos| per unit lr_dni) falls as 1/|x|^2 with the feature norm |x|, so lr*
    grows as mean |x|^2: for unit rows, k = 50, hidden = 256, D = 256 it is ~6e-3 (spread
    ~0.026, slope ~4.3); rows of norm 20 need ~400x that.
    """
    slope, spread, _ = first_update_slope(train_embeddings, k, hidden, n_probe, seed)
    base = target * spread / slope
    return [float(f"{base * f:.3g}") for f in factors]


def holdout_fraction_for_k(
    cluster_sizes: Sequence[int] | np.ndarray,
    k: int,
    n_val_queries: int,
    db_per_k: float = 4.0,
    min_classes: int = 20,
    margin: float = 1.25,
    max_fraction: float = 0.5,
) -> float:
    """Fraction of clusters to hold out so that validation resembles a test set.

    Inputs: ``cluster_sizes`` of the training data (items per cluster); ``k`` (SSR re-ranks
    each query's top-k); ``n_val_queries``. Requirements: a held-out database (items not
    used as queries) of at least ``db_per_k * k`` items (SSR re-ranks at most a quarter of
    it, as on a test set, instead of half of it), and at least ``min_classes`` held-out
    clusters (validation mAP is averaged over queries from few clusters: its noise falls with
    their number). ``margin`` covers the hash hold-out drawing fewer clusters than its
    fraction. Returns the fraction (capped at ``max_fraction``; a capped value means the data
    are too small for this k / n_val_queries: lower them).
    """
    sizes = np.asarray(cluster_sizes, dtype=np.float64)
    sizes = sizes[sizes >= 2]
    if sizes.size == 0:
        raise ValueError("cluster_sizes: no cluster with two items")
    need_items = n_val_queries + db_per_k * k
    frac = max(need_items / sizes.sum(), min_classes / sizes.size) * margin
    return float(min(max_fraction, round(frac, 3)))


def sequence_pass_stats(
    emb: np.ndarray,
    labels: np.ndarray,
    k: int,
    sequence_length: int,
    min_positives: int,
    max_ap: float = 0.8,
    n_draws: int = 600,
    seed: int = 0,
) -> dict:
    """Draws sequences as ``rt.draw_sequences`` does and reports: the pass rate of the filter,
    the mean number of the query's positives among the drawn items, and among passing
    sequences the mean positives in the top-k and the mean top-k AP."""
    N = len(emb)
    L = min(sequence_length, N - 1)
    rng = np.random.default_rng(seed)
    in_draw, passed, pos_top, ap_top = [], 0, [], []
    for _ in range(n_draws):
        idx = rng.choice(N, size=L + 1, replace=False)
        q, items = idx[0], idx[1:]
        same = labels[items] == labels[q]
        in_draw.append(same.sum())
        top = np.argsort(-(emb[items] @ emb[q]), kind="stable")[:k]
        p = same[top]
        ap = topk_ap(p[None])[0]
        if p.sum() > min_positives and ap < max_ap:
            passed += 1
            pos_top.append(p.sum())
            ap_top.append(ap)
    return {
        "sequence_length": L,
        "pass_rate": passed / n_draws,
        "positives_in_draw": float(np.mean(in_draw)),
        "positives_in_topk": float(np.mean(pos_top)) if pos_top else 0.0,
        "topk_ap": float(np.mean(ap_top)) if ap_top else float("nan"),
    }


def relaxed_sequence_filter(
    emb: np.ndarray,
    labels: np.ndarray,
    k: int,
    sequence_length: int = 1000,
    min_positives: int = 5,
    max_ap: float = 0.8,
    min_pass_rate: float = 0.25,
    target_positives: float = 10.0,
    seed: int = 0,
) -> tuple[int, int, dict]:
    """(sequence_length, min_positives, stats) relaxed until sequences carry signal.

    Inputs: training rows ``emb`` (N, D) L2-normalised and ``labels`` (N,); the model's ``k``;
    the requested filter. Step 1: lengthen the sequence until a draw holds
    ``target_positives`` of the query's positives on average (expected positives = L * (mean
    cluster size - 1) / N), up to all N - 1 rows. Step 2: while fewer than ``min_pass_rate``
    of the draws pass, lower min_positives (not below 1). ``stats``: the last
    :func:`sequence_pass_stats`.
    """
    N = len(emb)
    _, counts = np.unique(labels, return_counts=True)
    per_item_pos = float(((counts - 1) * counts).sum() / counts.sum())  # mean positives of a random query
    need = math.ceil(target_positives * (N - 1) / max(per_item_pos, 1e-9))
    L = int(min(N - 1, max(sequence_length, need)))
    mp = min_positives
    stats = sequence_pass_stats(emb, labels, k, L, mp, max_ap, n_draws=300, seed=seed)
    while stats["pass_rate"] < min_pass_rate and mp > 1:
        mp -= 1
        stats = sequence_pass_stats(emb, labels, k, L, mp, max_ap, n_draws=300, seed=seed)
    return L, mp, stats


@dataclass(frozen=True)
class ProtocolProfile:
    """What an evaluation set looks like to a re-ranker (issue 20 item 6): ``n_queries``,
    ``n_database`` items, and the mean number per query of ``easy``, ``hard`` and ``junk``
    database items (revisited protocol; a validation set from clusters has easy only)."""

    name: str
    n_queries: int
    n_database: int
    easy: float
    hard: float
    junk: float

    @property
    def positives(self) -> float:
        """Positives per query of the medium protocol (easy + hard), the one choices are made on."""
        return self.easy + self.hard

    def row(self, k1_grid: Sequence[int] = (40, 80, 160), scale: float = 1.0) -> dict:
        """A table row: sizes, positives, positives per 1,000 database items, and for each k1 of
        the test grid the share of the database it covers and its multiple of the positives;
        scale: the factor applied to k1 on this set (a validation set's ``scaled_count``)."""
        out: dict = {
            "set": self.name,
            "queries": self.n_queries,
            "database": self.n_database,
            "easy/query": round(self.easy, 1),
            "hard/query": round(self.hard, 1),
            "junk/query": round(self.junk, 1),
            "positives per 1k db": round(1000 * self.positives / max(1, self.n_database), 2),
        }
        for k1 in k1_grid:
            k = scaled_count(k1, scale)
            out[f"k1={k1}: % of db"] = round(100 * min(1.0, k / max(1, self.n_database)), 1)
            out[f"k1={k1} / positives"] = round(k / max(self.positives, 1e-9), 1)
        return out


def protocol_profile(name: str, gnd: Sequence[Mapping], n_database: int) -> ProtocolProfile:
    """The profile of a revisited-format ground truth (one dict per query, ``easy``/``hard``/
    ``junk`` database indices) over ``n_database`` items."""
    counts = np.array([[len(g.get(key, ())) for key in ("easy", "hard", "junk")] for g in gnd], dtype=np.float64)
    mean = counts.mean(0) if len(counts) else np.zeros(3)
    return ProtocolProfile(name, len(gnd), int(n_database), float(mean[0]), float(mean[1]), float(mean[2]))


def mirrored_database_size(val_positives: float, n_held_database: int, n_available: int, test: ProtocolProfile) -> int:
    """Validation database size with the test's positives per database item:
    ``val_positives * test.n_database / test.positives``, at least the held-out items
    (``n_held_database``) and at most the held-out plus training items (``n_available``)."""
    if test.positives <= 0:
        return n_held_database
    target = round(val_positives * test.n_database / test.positives)
    return int(min(n_available, max(n_held_database, target)))


# Arguments of the grids that count neighbours in the database (scaled with its size, ``scale``).
SCALED_ARGUMENTS = ("k", "k1", "k2", "K")
# Arguments that count top items expected to be positives of the item expanded (scaled with the
# positives per query, ``qe_scale``): alpha-DBA-QE's n_qe and n_dba (see ``scaled_qe_n``).
QE_ARGUMENTS = ("n_qe", "n_dba")


def scaled_count(k: int, scale: float) -> int:
    """``round(k * scale)``, at least 1."""
    return max(1, int(round(k * scale)))


def scaled_qe_n(n: int, qe_scale: float) -> int:
    """A QE count on validation: ``round(n * qe_scale)``, at least 1; 0 (alpha-DBA-QE's "no DBA") stays 0.

    Why QE's n is scaled by the positives per query (validation / test), not by the database:
    AQE, AQEwD, alpha-QE and DQE average (or weigh) the query's top n, and what decides whether
    that helps is how many of those n are positives, i.e. n against the number of positives the
    query has (on a perfect ranking, a top-n holds min(n, P) positives). A validation query with
    3.2 positives averaging its top 3 mixes in about as many negatives as a test query with 18.2
    positives averaging its top 17, so n=3 on the test is n=round(3 * 3.2 / 18.2)=1 on
    validation. alpha-DBA-QE's n_qe is the same count. Its n_dba averages each database item
    with its own top n_dba; the items whose ranks decide the mAP are the positives, and a
    positive's same-cluster items in the database are the query's other positives (plus junk
    on the test), so the count that n_dba must stay below is again the positives per query:
    it is scaled the same way. (Database items that are nobody's positive have other cluster
    sizes, which the test ground truth does not give; they are left out of the argument.)
    Under ``mirror-test`` the database is padded to the test's positives per item, so
    ``qe_scale`` equals the database scale whenever the padding reached its target.
    """
    return 0 if n == 0 else scaled_count(n, qe_scale)


def positives_scale(val_positives: float, test_positives: float) -> float:
    """``qe_scale``: validation positives per query over the test's (1 when either is unknown or 0)."""
    if val_positives <= 0 or test_positives <= 0:
        return 1.0
    return val_positives / test_positives


def scaled_krecip(points: Sequence[KReciprocalPoint], scale: float) -> list[KReciprocalPoint]:
    """k-reciprocal points with k1 and k2 scaled (lambda kept), in the same order."""
    return [replace(p, k1=scaled_count(p.k1, scale), k2=scaled_count(p.k2, scale)) for p in points]


def scaled_point(p: ShortlistPoint, scale: float, qe_scale: float = 1.0) -> ShortlistPoint:
    """One shortlist point with its neighbour counts (``SCALED_ARGUMENTS``) scaled by ``scale`` and
    its QE counts (``QE_ARGUMENTS``) by ``qe_scale``; other arguments kept."""

    def one(k: str, v: float) -> float:
        if k in SCALED_ARGUMENTS:
            return scaled_count(int(v), scale)
        if k in QE_ARGUMENTS:
            return scaled_qe_n(int(v), qe_scale)
        return v

    return ShortlistPoint(tuple((k, one(k, v)) for k, v in p.values))


def scaled_shortlist(
    points: Mapping[str, Sequence[ShortlistPoint]], scale: float, qe_scale: float = 1.0
) -> dict[str, list[ShortlistPoint]]:
    """Each shortlist re-ranker's points scaled (``scaled_point``), same order; duplicates kept (the
    caller maps them back, ``validation.Grids``)."""
    return {m: [scaled_point(p, scale, qe_scale) for p in ps] for m, ps in points.items()}
