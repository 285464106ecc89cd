"""Ray side of the retrieval pipeline: a Tune grid of RetrievalSSR trainings."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ssr_tasks.retrieval_train import RetrievalTrainConfig


def trial_dir(ckpt_root: Path, lr_dni: float) -> Path:
    return Path(ckpt_root) / f"lr_dni={lr_dni:g}"


def split_clusters(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of training and validation clusters (disjoint clusters, seeded)."""
    clusters = np.unique(labels)
    rng = np.random.default_rng(seed)
    val_c = set(rng.choice(clusters, size=max(1, int(round(len(clusters) * val_fraction))), replace=False).tolist())
    is_val = np.asarray([lab in val_c for lab in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_training_sequences(features: str, cfg: RetrievalTrainConfig, n_train: int = 4000, n_val: int = 300):
    """Features of the training split and train/validation sequences over disjoint clusters."""
    from storage.features import read_features

    from ssr_tasks.retrieval_train import Sequences, make_sequences

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


def retrieval_trial(config: dict) -> None:
    import torch
    from ray import tune

    from storage.atomic import atomic_write_text
    from ssr_tasks.retrieval_train import train_retrieval

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = RetrievalTrainConfig(**{**config["train"], "lr_dni": float(config["lr_dni"])})
    emb, train, val = load_training_sequences(config["features"], cfg)
    device = "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"
    out = trial_dir(Path(config["ckpt_root"]), cfg.lr_dni)
    summary = train_retrieval(cfg, emb, train, val, out, device=device, report=lambda row: tune.report({**row, "progress": row["iteration"] / cfg.iterations}))
    summary["n_train_sequences"], summary["n_val_sequences"] = len(train), len(val)
    atomic_write_text(out / "summary.json", json.dumps(summary))
    tune.report({"best_val_ap": summary["best_val"], "done": 1, "progress": 1.0})


def run_grid(base: RetrievalTrainConfig, lr_grid: list[float], features: Path, ckpt_root: Path, storage_path: Path,
             max_failures: int = 2, progress=None) -> list[dict]:
    from ssr_tasks.ray_grid import tune_grid

    pending = [lr for lr in lr_grid if not (trial_dir(ckpt_root, lr) / "summary.json").exists()]
    space = {"train": {k: v for k, v in asdict(base).items() if k != "lr_dni"}, "features": str(features), "ckpt_root": str(ckpt_root)}
    tune_grid(retrieval_trial, "lr_dni", pending, space, "retrieval-ssr", storage_path, max_failures, progress)
    return [{"lr_dni": lr, **json.loads((trial_dir(ckpt_root, lr) / "summary.json").read_text())} for lr in lr_grid]
