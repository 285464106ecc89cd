"""Retrieval SSR training on sequences (SSR_METHOD.md section 4), plain code.

A training sequence is a query and ``sequence_length`` database items drawn from the
training features (cluster labels as in SfM-120k); its top-k by the initial score is what
SSR refines. Sequences are kept only when the initial top-k is imperfect (AP < 0.8) and has
more than 5 true positives. The built-in data has small clusters (tens of renderings), so a
sequence holds every other member of the query's cluster plus random items; with SfM-120k's
large clusters this reduces to the paper's uniform draw.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model import RetrievalSSR
from ssr_model.losses import info_bce
from ssr_tasks.resume import LoopState, TrainingCheckpoint, finished, mark_finished
from storage.checkpoints import save_checkpoint
from storage.features import read_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalTrainConfig:
    feat_dim: int
    k: int = 50
    steps: int = 1
    hidden: int = 1024
    lr_dni: float = 1e-4
    sequence_length: int = 1000
    min_positives: int = 6
    iterations: int = 1000
    batch_queries: int = 16
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_every: int = 250
    seed: int = 0

    def build(self) -> RetrievalSSR:
        """The untrained model (the one place its arguments are made)."""
        return RetrievalSSR(self.feat_dim, self.k, self.steps, lr_dni=self.lr_dni, hidden=self.hidden)


@dataclass(frozen=True)
class Sequences:
    """neighbour rows (S, k) of the initial top-k, query rows (S,), positives (S, k) bool."""

    query: np.ndarray
    neighbours: np.ndarray
    positives: np.ndarray

    def __len__(self) -> int:
        return len(self.query)


def topk_ap(positives: np.ndarray) -> np.ndarray:
    """AP within the list (S, k) of booleans, over the positives present in it."""
    hits = positives.astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    ranks = np.arange(1, positives.shape[1] + 1)
    n_pos = np.maximum(hits.sum(1), 1)
    return (hits * cum / ranks).sum(1) / n_pos


def make_sequences(emb: np.ndarray, labels: np.ndarray, k: int, sequence_length: int, n: int, seed: int,
                   max_ap: float = 0.8, min_pos: int = 6, max_tries: int = 20) -> Sequences:
    """Sample up to ``n`` filtered sequences. emb (N, D) L2-normalised rows, labels (N,)."""
    if k >= sequence_length:
        raise ValueError(f"k: expected fewer than sequence_length={sequence_length} neighbours, got {k}")
    rng = np.random.default_rng(seed)
    N = len(emb)
    by_label: dict = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    qs, nbs, pos = [], [], []
    for _ in range(max_tries):
        cand = rng.integers(0, N, size=2 * n)
        for q in cand:
            same = np.asarray([i for i in by_label[labels[q]] if i != q], np.int64)
            others = rng.choice(N, size=sequence_length, replace=False)
            others = others[(labels[others] != labels[q])][: max(0, sequence_length - len(same))]
            db = np.concatenate([same, others])
            scores = emb[db] @ emb[q]
            top = db[np.argsort(-scores, kind="stable")[:k]]
            p = labels[top] == labels[q]
            if p.sum() >= min_pos and topk_ap(p[None])[0] < max_ap:
                qs.append(q)
                nbs.append(top)
                pos.append(p)
                if len(qs) >= n:
                    return Sequences(np.asarray(qs), np.stack(nbs), np.stack(pos))
    if not qs:
        raise ValueError(f"no training sequence passed the filter (>= {min_pos} positives in the top-{k} and AP < {max_ap}); "
                         "the training features may be too easy or their clusters too small")
    return Sequences(np.asarray(qs), np.stack(nbs), np.stack(pos))


def _batch(emb_t: torch.Tensor, seqs: Sequences, idx: np.ndarray, device):
    q = emb_t[torch.from_numpy(seqs.query[idx])].to(device)
    nb = emb_t[torch.from_numpy(seqs.neighbours[idx])].to(device)
    return q, nb, torch.from_numpy(seqs.positives[idx]).to(device)


@torch.no_grad()
def evaluate_sequences(model: RetrievalSSR, emb_t: torch.Tensor, seqs: Sequences, device, batch: int = 64) -> float:
    """Mean AP within the top-k after re-ranking (validation metric)."""
    model.eval()
    aps = []
    for start in range(0, len(seqs), batch):
        idx = np.arange(start, min(start + batch, len(seqs)))
        q, nb, pos = _batch(emb_t, seqs, idx, device)
        order = model(q, nb).argsort(dim=-1, descending=True).cpu().numpy()
        aps.append(topk_ap(np.take_along_axis(pos.cpu().numpy(), order, axis=1)))
    return float(np.concatenate(aps).mean())


def train_retrieval(cfg: RetrievalTrainConfig, emb: np.ndarray, train: Sequences, val: Sequences, out_dir: Path,
                    device="cpu", report: Callable[[dict], None] | None = None) -> dict:
    """SGD on InfoBCE; validation AP every ``val_every``; checkpoint/resume; keep the best.

    emb (N, D) training features; train / val: sequences over rows of ``emb``. Returns the
    summary {"best_val", "best_path", "history", "config"} (also left in ``summary.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "summary.json"
    summary = finished(done)
    if summary is not None:
        return summary
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    emb_t = F.normalize(torch.from_numpy(emb).float(), dim=-1, eps=1e-12)
    model = cfg.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ckpt = TrainingCheckpoint(out_dir / "last.pt", model=model, optim=opt)
    state = ckpt.restore()
    if state is not None:
        log.info("retrieval SSR: resuming at iteration %d", state.done)
    else:
        # The untrained model is the bar to beat: a trained one is kept only if it does better.
        best = evaluate_sequences(model, emb_t, val, device)
        state = LoopState(0, best, [{"iteration": 0, "val_ap": best, "loss": float("nan")}])
        save_checkpoint(out_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    for it in range(state.done, cfg.iterations):
        model.train()
        rng = np.random.default_rng(cfg.seed * 1_000_003 + it)
        idx = rng.choice(len(train), size=min(cfg.batch_queries, len(train)), replace=False)
        q, nb, pos = _batch(emb_t, train, idx, device)
        loss = info_bce(model(q, nb), pos, model.scale_cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % cfg.val_every == 0 or it + 1 == cfg.iterations:
            val_ap = evaluate_sequences(model, emb_t, val, device)
            state.history.append({"iteration": it + 1, "val_ap": val_ap, "loss": loss.item()})
            if val_ap > state.best:
                state.best = val_ap
                save_checkpoint(out_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
            state.done = it + 1
            ckpt.save(state)
            log.info("retrieval SSR iteration %d/%d loss %.4f val AP %.2f%% (best %.2f%%)",
                     it + 1, cfg.iterations, loss.item(), 100 * val_ap, 100 * state.best)
            if report is not None:
                report({"iteration": it + 1, "loss": loss.item(), "val_ap": val_ap, "best_val_ap": state.best})
    return mark_finished(done, {"best_val": state.best, "best_path": str(out_dir / "best.pt"), "history": state.history,
                                "config": asdict(cfg)})


def split_clusters(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of training and validation clusters (disjoint clusters, seeded)."""
    clusters = np.unique(labels)
    rng = np.random.default_rng(seed)
    val_c = set(rng.choice(clusters, size=max(1, int(round(len(clusters) * val_fraction))), replace=False).tolist())
    is_val = np.asarray([lab in val_c for lab in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_training_sequences(features: Path, cfg: RetrievalTrainConfig, n_train: int = 4000,
                            n_val: int = 300) -> tuple[np.ndarray, Sequences, Sequences]:
    """L2-normalised features (N, D) of the training split and train/validation sequences over disjoint clusters."""
    table = read_features(Path(features), split="train")
    emb = table.embeddings / np.maximum(np.linalg.norm(table.embeddings, axis=1, keepdims=True), 1e-12)
    labels = np.asarray([str(x) for x in table.labels])
    tr, va = split_clusters(labels, 0.1, cfg.seed)
    out = []
    for rows, n, seed in ((tr, n_train, cfg.seed), (va, n_val, cfg.seed + 1)):
        s = make_sequences(emb[rows], labels[rows], cfg.k, min(cfg.sequence_length, len(rows) - 1), n, seed,
                           min_pos=cfg.min_positives)
        out.append(Sequences(rows[s.query], rows[s.neighbours], s.positives))
    return emb.astype(np.float32), out[0], out[1]
