"""Retrieval SSR training on sequences drawn as published (SSR_METHOD.md section 4), plain code.

A training sequence is a query and ``sequence_length`` items drawn uniformly without
replacement from the whole training set (the query excluded); SSR refines the top-k of the
items by the initial score. A sequence is kept when that top-k has AP < ``max_ap`` (0.8)
and more than ``min_positives`` true positives (same cluster; 5 on SfM-120k). Every
validation period draws fresh sequences, ``val_every * batch_queries`` of them, seeded by
the period so that a resumed run draws the same ones.

Validation never uses the test sets: held-out clusters of the training data form a
revisited-format set (``storage.landmark_tables.validation_ground_truth``): queries drawn
from it are ranked against all of it, their top-k re-ranked by SSR, and the medium-protocol
mAP is the score that picks the checkpoint (and, across trials, ``lr_dni``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssr_model import RetrievalSSR
from ssr_model.losses import info_bce
from ssr_model.metrics import revisited_map
from ssr_tasks.config import RetrievalTrainParams
from ssr_tasks.resume import LoopState, TrainingCheckpoint, finished, mark_finished, stalled
from storage.checkpoints import save_checkpoint
from storage.features import read_features
from storage.landmark_tables import validation_ground_truth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sequences:
    """query rows (S,), neighbour rows (S, k) of the initial top-k, positives (S, k) bool."""

    query: np.ndarray
    neighbours: np.ndarray
    positives: np.ndarray

    def __len__(self) -> int:
        return len(self.query)


def topk_ap(positives: np.ndarray) -> np.ndarray:
    """AP within each list (S, k) of booleans, over the positives present in it."""
    hits = positives.astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    ranks = np.arange(1, positives.shape[1] + 1)
    n_pos = np.maximum(hits.sum(1), 1)
    return (hits * cum / ranks).sum(1) / n_pos


def draw_sequences(
    emb: np.ndarray,
    labels: np.ndarray,
    k: int,
    sequence_length: int,
    n: int,
    seed: int,
    max_ap: float = 0.8,
    min_positives: int = 5,
    max_draws: int | None = None,
) -> Sequences:
    """``n`` filtered sequences drawn uniformly. emb (N, D) L2-normalised rows, labels (N,).

    Each draw is 1 + L distinct rows (L = min(sequence_length, N - 1)), the first being the
    query; it is kept when its top-k by ``emb @ emb[query]`` holds more than
    ``min_positives`` items of the query's label and has AP < ``max_ap``. Draws whose L items
    hold too few positives in total are rejected before any score is computed.
    """
    N = len(emb)
    L = min(sequence_length, N - 1)
    if not 1 <= k <= L:
        raise ValueError(f"k: expected 1 <= k <= {L} (items per sequence), got {k}")
    rng = np.random.default_rng(seed)
    max_draws = max_draws or max(100_000, 1000 * n)
    qs: list[int] = []
    nbs: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    draws = 0
    while len(qs) < n and draws < max_draws:
        draws += 1
        idx = rng.choice(N, size=L + 1, replace=False)
        q, items = idx[0], idx[1:]
        same = labels[items] == labels[q]
        if same.sum() <= min_positives:
            continue
        top = np.argsort(-(emb[items] @ emb[q]), kind="stable")[:k]
        p = same[top]
        if p.sum() > min_positives and topk_ap(p[None])[0] < max_ap:
            qs.append(q)
            nbs.append(items[top])
            pos.append(p)
    if len(qs) < n:
        raise ValueError(
            f"training sequences: only {len(qs)} of {n} passed the filter (more than {min_positives} positives "
            f"in the top-{k} and AP < {max_ap}) in {draws} draws of {L} items; the training clusters are too "
            "small or too easy for these settings (lower min_positives or raise sequence_length)"
        )
    return Sequences(np.asarray(qs, np.int64), np.stack(nbs).astype(np.int64), np.stack(pos))


@dataclass(frozen=True)
class ValidationSet:
    """Held-out queries (Qv, D) ranked against the held-out database (Mv, D), disjoint, both
    L2-normalised; ``initial`` (Qv, Mv) database rows best first; ``gnd`` per query
    (revisited format, indices into the database)."""

    queries: np.ndarray
    database: np.ndarray
    initial: np.ndarray
    gnd: list[dict]

    @classmethod
    def from_clusters(
        cls,
        emb: np.ndarray,
        labels: np.ndarray,
        n_queries: int,
        seed: int,
        distractors: np.ndarray | None = None,
        spread: bool = False,
    ) -> ValidationSet:
        """emb (M, D) L2-normalised held-out rows, labels (M,) their clusters; distractors (X, D)
        L2-normalised rows of other clusters appended to the database (negatives of every
        query); spread: queries one per cluster before any second
        (``storage.landmark_tables.validation_ground_truth``)."""
        rows, db_rows, gt = validation_ground_truth(labels, n_queries, seed, spread=spread)
        q, db = emb[rows], emb[db_rows]
        if distractors is not None and len(distractors):
            db = np.concatenate([db, distractors.astype(db.dtype, copy=False)])
        return cls(q, db, np.argsort(-(q @ db.T), axis=1, kind="stable"), gt.gnd)


def rerank_top(
    model: RetrievalSSR, queries: torch.Tensor, database: torch.Tensor, ranks: np.ndarray, batch: int = 64
) -> np.ndarray:
    """ranks (Q, N) with each row's first ``model.k`` entries re-ordered by SSR; queries (Q, D),
    database (N, D) tensors on the model's device."""
    k = model.k
    out = ranks.copy()
    for s in range(0, len(ranks), batch):
        top = torch.from_numpy(ranks[s : s + batch, :k]).to(database.device)
        refined = model(queries[s : s + batch], database[top])
        order = refined.argsort(dim=-1, descending=True, stable=True)
        out[s : s + batch, :k] = top.gather(1, order).cpu().numpy()
    return out


@torch.no_grad()
def validation_map(model: RetrievalSSR, val: ValidationSet, device) -> float:
    """Medium-protocol mAP (fraction) of the validation queries after SSR re-ranks their top-k."""
    model.eval()
    if val.initial.shape[1] < model.k:
        raise ValueError(f"validation: the held-out database has {val.initial.shape[1]} items, fewer than k={model.k}")
    q = torch.from_numpy(val.queries).float().to(device)
    db = torch.from_numpy(val.database).float().to(device)
    ranks = rerank_top(model, q, db, val.initial)
    return revisited_map(ranks, val.gnd)["medium"]["map"] / 100.0


def period_sequences(cfg: RetrievalTrainParams, emb: np.ndarray, labels: np.ndarray, period: int) -> Sequences:
    return draw_sequences(
        emb,
        labels,
        cfg.k,
        cfg.sequence_length,
        cfg.val_every * cfg.batch_queries,
        seed=cfg.seed * 1_000_003 + period,
        max_ap=cfg.max_ap,
        min_positives=cfg.min_positives,
    )


def _save_best(model: RetrievalSSR, path: Path) -> None:
    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def train_retrieval(
    cfg: RetrievalTrainParams,
    emb: np.ndarray,
    labels: np.ndarray,
    val: ValidationSet,
    out_dir: Path,
    device="cpu",
    report: Callable[[dict], None] | None = None,
) -> dict:
    """SGD on InfoBCE over fresh sequences each period; validation mAP every ``val_every``
    iterations; checkpoint/resume at those points; the best checkpoint is kept.

    emb (N, D) L2-normalised training rows, labels (N,) their clusters. Returns the summary
    ``{"best_val", "best_iteration", "best_path", "history", "config"}`` (also left in
    ``summary.json``); the untrained model (iteration 0) is the bar a checkpoint must beat.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "summary.json"
    summary = finished(done)
    if summary is not None:
        return summary
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    emb_t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    model = cfg.build(emb.shape[1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ckpt = TrainingCheckpoint(out_dir / "last.pt", model=model, optim=opt)
    state = ckpt.restore()
    if state is not None:
        log.info("retrieval SSR: resuming at iteration %d", state.done)
    else:
        best = validation_map(model, val, device)
        state = LoopState(0, best, [{"iteration": 0, "val_map": best, "loss": float("nan")}])
        _save_best(model, out_dir / "best.pt")
    seqs: Sequences | None = None
    period = -1
    for it in range(state.done, cfg.iterations):
        if it // cfg.val_every != period:
            period = it // cfg.val_every
            seqs = period_sequences(cfg, emb, labels, period)
        assert seqs is not None  # drawn at the first iteration (period starts at -1)
        model.train()
        s = (it - period * cfg.val_every) * cfg.batch_queries
        sl = slice(s, s + cfg.batch_queries)
        q = emb_t[torch.from_numpy(seqs.query[sl])].to(device)
        nb = emb_t[torch.from_numpy(seqs.neighbours[sl])].to(device)
        loss = info_bce(model(q, nb), torch.from_numpy(seqs.positives[sl]).to(device), model.scale_cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % cfg.val_every == 0 or it + 1 == cfg.iterations:
            val_map = validation_map(model, val, device)
            state.history.append({"iteration": it + 1, "val_map": val_map, "loss": loss.item()})
            if val_map > state.best:
                state.best = val_map
                _save_best(model, out_dir / "best.pt")
            state.done = it + 1
            ckpt.save(state)
            log.info(
                "retrieval SSR iteration %d/%d loss %.4f validation mAP %.2f%% (best %.2f%%)",
                it + 1,
                cfg.iterations,
                loss.item(),
                100 * val_map,
                100 * state.best,
            )
            if report is not None:
                report({"iteration": it + 1, "loss": loss.item(), "val_map": val_map, "best_val_map": state.best})
            if stalled(state.history, "val_map", cfg.patience):
                log.info(
                    "retrieval SSR: no new best validation mAP for %d validations; stopping at iteration %d "
                    "(iterations %d are a cap)",
                    cfg.patience,
                    it + 1,
                    cfg.iterations,
                )
                break
    best_iteration = max(state.history, key=lambda h: (h["val_map"], -h["iteration"]))["iteration"]
    summary = mark_finished(
        done,
        {
            "best_val": state.best,
            "best_iteration": best_iteration,
            "best_path": str(out_dir / "best.pt"),
            "history": state.history,
            "config": cfg.model_dump(),
        },
    )
    ckpt.remove()  # finished: the best weights are what is kept (Tune checkpoints copy the folder)
    return summary


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def distractor_rows(n_rows: int, n_wanted: int, seed: int) -> np.ndarray:
    """``min(n_wanted, n_rows)`` distinct rows of ``n_rows`` (sorted), drawn with ``default_rng([seed, 1])``."""
    n = max(0, min(n_wanted, n_rows))
    return np.sort(np.random.default_rng([seed, 1]).choice(n_rows, size=n, replace=False))


def load_validation(
    train_table: Path,
    n_queries: int,
    seed: int,
    feat_dim: int | None = None,
    n_database: int = 0,
    spread: bool = False,
    train_rows: np.ndarray | None = None,
) -> ValidationSet:
    """The validation set of the held-out rows (split ``val``) of a training table.

    n_database: database size wanted; when the held-out items left after the queries are
    fewer, rows of split ``train`` (``train_rows``, L2-normalised, else read from the table)
    drawn with ``distractor_rows`` fill it up to that size or to all of them; 0: none.
    spread: queries one per held-out cluster before any second."""
    held = read_features(Path(train_table), split="val", expected_dim=feat_dim)
    labels = np.asarray(held.labels)
    distractors = None
    if n_database:
        _, db_rows, _ = validation_ground_truth(labels, n_queries, seed, spread=spread)
        n_extra = n_database - len(db_rows)
        if n_extra > 0:
            if train_rows is None:
                train_rows = _unit(read_features(Path(train_table), split="train", expected_dim=feat_dim).embeddings)
            distractors = train_rows[distractor_rows(len(train_rows), n_extra, seed)]
    return ValidationSet.from_clusters(_unit(held.embeddings), labels, n_queries, seed, distractors, spread)


def load_training_data(train_table: Path, cfg: RetrievalTrainParams) -> tuple[np.ndarray, np.ndarray, ValidationSet]:
    """Training rows (split ``train``: L2-normalised features (N, D), cluster labels (N,))
    and the validation set of the held-out rows of ``train_table`` (``cfg.val_protocol``,
    ``cfg.val_database``: see ``load_validation``)."""
    train = read_features(Path(train_table), split="train")
    emb = _unit(train.embeddings)
    return emb, np.asarray(train.labels), validation_of(cfg, train_table, train.dim, train_rows=emb)


def validation_of(
    cfg: RetrievalTrainParams, train_table: Path, feat_dim: int | None = None, train_rows: np.ndarray | None = None
) -> ValidationSet:
    """The validation set ``cfg`` asks for (``load_validation`` with its n_val_queries, seed,
    val_database and val_protocol: queries spread over the clusters under mirror-test)."""
    return load_validation(
        Path(train_table),
        cfg.n_val_queries,
        cfg.seed,
        feat_dim,
        n_database=cfg.val_database,
        spread=cfg.val_protocol == "mirror-test",
        train_rows=train_rows,
    )
