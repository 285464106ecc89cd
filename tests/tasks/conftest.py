from __future__ import annotations

import numpy as np
import pytest


def make_features(path, n_classes=(12, 6, 6), per_class=20, dim=16, seed=0, noise=0.9):
    """A features table of Gaussian clusters: split train/val/test with disjoint classes."""
    from storage.features import write_features

    rng = np.random.default_rng(seed)
    embs, labels, splits, paths = [], [], [], []
    for split, n in zip(("train", "val", "test"), n_classes):
        for c in range(n):
            centre = rng.normal(size=dim)
            embs.append(centre + noise * rng.normal(size=(per_class, dim)))
            labels += [f"{split}-c{c}"] * per_class
            splits += [split] * per_class
            paths += [f"{split}-c{c}/{i}.png" for i in range(per_class)]
    emb = np.concatenate(embs).astype(np.float32)
    write_features(path, ids=np.arange(len(emb)), labels=labels, splits=splits, embeddings=emb, paths=paths,
                   metadata={"dataset": "synthetic", "backbone": "none", "checkpoint_hash": "-", "dim": str(dim)})
    return path


@pytest.fixture(scope="session")
def synthetic_features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features") / "features.parquet")
