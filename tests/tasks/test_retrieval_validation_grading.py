"""The glyph test's easy / hard / junk rule applied to held-out training clusters (issue 20 item 6)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from ssr_tasks.retrieval.train import load_validation
from ssr_tasks.retrieval.validation import glyph_grader, graded_validation
from storage.errors import DataValueError
from storage.features import write_features
from storage.glyphs.dataset import retrieval_training_renderings
from storage.glyphs.fonts import family_of
from storage.landmark_tables import validation_ground_truth


def test_grade_splits_each_querys_positives_by_hand():
    clusters = np.array([0, 0, 0, 0, 1, 1, 1])
    kind = {0: "easy", 1: "hard", 2: "junk", 3: "easy", 4: None, 5: "easy", 6: "hard"}  # by row

    def grade(q, rows):
        return [kind[int(r)] for r in rows]

    q, db, gt = validation_ground_truth(clusters, 2, seed=0, spread=True, grade=grade)
    plain = validation_ground_truth(clusters, 2, seed=0, spread=True)
    assert np.array_equal(q, plain[0]) and np.array_equal(db, plain[1])  # the same draw
    for qi, g, p in zip(q, gt.gnd, plain[2].gnd):
        rows = db[p["easy"]]  # every item of the query's cluster in the database
        for key in ("easy", "hard", "junk"):
            assert db[g[key]].tolist() == [r for r in rows if kind[int(r)] == key]
        assert qi not in rows
    with pytest.raises(DataValueError, match="expected one of easy, hard, junk or None"):
        validation_ground_truth(clusters, 2, seed=0, grade=lambda q, rows: ["positive"] * len(rows))


def test_training_renderings_are_recomputed_byte_for_byte(glyphs_small, tmp_path):
    root = glyphs_small["retrieval_root"]
    meta = retrieval_training_renderings(root)  # every image rendered again and compared with its file
    assert len(meta) == 64 * 5
    assert all(m["removed"] == 0.0 and m["aug"]["occlusion"] is None for m in meta.values())
    assert max(abs(m["aug"]["rotation_deg"]) for m in meta.values()) <= 10  # the mild range
    # a changed image (other fonts, other generator) is refused, naming the file
    copy = tmp_path / "glyphs-retrieval"
    folder = sorted(meta)[0].split("/")[0]
    (copy / "train").mkdir(parents=True)
    shutil.copy(f"{root}/dataset.json", copy / "dataset.json")
    shutil.copytree(f"{root}/train/{folder}", copy / "train" / folder)
    (copy / "train" / folder / f"{folder}_01.png").write_bytes(b"not the rendering")
    with pytest.raises(ValueError, match=re.escape(f"{folder}_01.png: differs from its rendering")):
        retrieval_training_renderings(copy)
    info = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**info, "generator_version": "0"}))
    with pytest.raises(ValueError, match="expected a complete build of version"):
        retrieval_training_renderings(copy, verify=False)


def test_held_out_glyphs_are_easy_by_font_family_and_never_junk(glyphs_small, tmp_path):
    root = glyphs_small["retrieval_root"]
    meta = retrieval_training_renderings(root, verify=False)
    folders = sorted({p.split("/")[0] for p in meta})[:8]  # 8 held-out clusters of 5
    paths = [p for p in sorted(meta) if p.split("/")[0] in folders]
    labels = np.array([p.split("/")[0] for p in paths])
    grade = glyph_grader(root, [f"train/{p}" for p in paths])
    q, db, gt = validation_ground_truth(labels, 8, seed=0, spread=True, grade=grade)
    n_easy = n_hard = 0
    for qi, g in zip(q, gt.gnd):
        assert len(g["junk"]) == 0  # mild renderings, never occluded
        fq = family_of(meta[paths[qi]]["font"])
        assert all(family_of(meta[paths[db[i]]]["font"]) == fq for i in g["easy"])
        assert all(family_of(meta[paths[db[i]]]["font"]) != fq for i in g["hard"])
        assert len(g["easy"]) + len(g["hard"]) == 4
        n_easy, n_hard = n_easy + len(g["easy"]), n_hard + len(g["hard"])
    assert n_easy > 0 and n_hard > 0
    # the pipeline's validation set, graded: same database and positives, easy/hard split
    rng = np.random.default_rng(0)
    train_paths = [p for p in sorted(meta) if p.split("/")[0] not in folders][:30]
    emb = rng.normal(size=(len(paths) + len(train_paths), 8)).astype(np.float32)
    table = tmp_path / "features.parquet"
    write_features(
        table,
        ids=np.arange(len(emb)),
        labels=np.concatenate([labels, [p.split("/")[0] for p in train_paths]]),
        splits=["val"] * len(paths) + ["train"] * len(train_paths),
        embeddings=emb,
        paths=[f"train/{p}" for p in paths + train_paths],
        metadata={"dataset": "glyphs-retrieval", "backbone": "none", "checkpoint_hash": "-"},
    )
    val = load_validation(table, 8, seed=0, n_database=50, spread=True)
    graded = graded_validation(val, table, root, 8, seed=0, spread=True)
    assert np.array_equal(graded.initial, val.initial) and len(graded.database) == 50
    for g, h, v in zip(graded.gnd, gt.gnd, val.gnd):
        assert g["easy"].tolist() == h["easy"].tolist() and g["hard"].tolist() == h["hard"].tolist()
        assert sorted(g["easy"].tolist() + g["hard"].tolist()) == v["easy"].tolist()
    with pytest.raises(ValueError, match="does not match"):
        graded_validation(val, table, root, 7, seed=0, spread=True)
    with pytest.raises(ValueError, match="expected train/U"):
        glyph_grader(root, ["jpg/db_00001.png"])
