"""The product's episode sampler: each way a different class, no image used twice in an episode.

(Moved here from tests/storage, which tested a second sampler that the product did not use.)"""

from __future__ import annotations

import numpy as np

from ssr_tasks.fewshot.episodes import load_split, sample_episodes


def test_ways_are_distinct_classes_and_images_are_not_reused(synthetic_features):
    val = load_split(synthetic_features, "val")
    eps = sample_episodes(val, 4, 3, 2, 3, seed=7)
    for e in range(len(eps)):
        way_labels = val.labels[eps.support[e, :, 0]]
        assert len(set(way_labels.tolist())) == 3
        rows = np.concatenate([eps.support[e].ravel(), eps.query[e].ravel()])
        assert len(np.unique(rows)) == 3 * (2 + 3)
