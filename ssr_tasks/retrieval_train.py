"""Retrieval SSR training on sequences (SSR_METHOD.md section 4), plain code.

A training sequence is a query and ``sequence_length`` database items drawn from the
training features (cluster labels as in SfM-120k); its top-k by the initial score is what
SSR refines. Sequences are kept only when the initial top-k is imperfect (AP < 0.8) and has
more than 5 true positives. The built-in data has small clusters (tens of renderings), so a
sequence holds every other member of the query's cluster plus random items; with SfM-120k's
large clusters this reduces to the paper's uniform draw.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ssr_model import RetrievalSSR
from ssr_model.losses import info_bce

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
    """SGD on InfoBCE; validation AP every ``val_every``; checkpoint/resume; keep the best."""
    from storage.atomic import atomic_write_text
    from storage.checkpoints import save_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    emb_t = F.normalize(torch.from_numpy(emb).float(), dim=-1, eps=1e-12)
    model = cfg.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    last = out_dir / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, best, history = int(state["iteration"]), float(state["best"]), json.loads(state["history"])
        log.info("retrieval SSR: resuming at iteration %d", start)
    else:
        # The untrained model is the bar to beat: a trained one is kept only if it does better.
        start, best = 0, evaluate_sequences(model, emb_t, val, device)
        history = [{"iteration": 0, "val_ap": best, "loss": float("nan")}]
        save_checkpoint(out_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    for it in range(start, cfg.iterations):
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
            history.append({"iteration": it + 1, "val_ap": val_ap, "loss": loss.item()})
            if val_ap > best:
                best = val_ap
                save_checkpoint(out_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
            save_checkpoint(last, {"model": model.state_dict(), "optim": opt.state_dict(), "iteration": it + 1,
                                   "best": best, "history": json.dumps(history)})
            log.info("retrieval SSR iteration %d/%d loss %.4f val AP %.2f%% (best %.2f%%)",
                     it + 1, cfg.iterations, loss.item(), 100 * val_ap, 100 * best)
            if report is not None:
                report({"iteration": it + 1, "loss": loss.item(), "val_ap": val_ap, "best_val_ap": best})
    summary = {"best_val": best, "best_path": str(out_dir / "best.pt"), "history": history, "config": asdict(cfg)}
    atomic_write_text(done, json.dumps(summary))
    return summary
