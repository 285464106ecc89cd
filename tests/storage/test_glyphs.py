"""Tests of the built-in glyph dataset (size "small": a few seconds per build)."""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.glyphs import GND_NAME, dataset, prepare_glyphs
from storage.glyphs import fonts as gf
from storage.glyphs import retrieval as gr

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def build_a(tmp_path_factory) -> tuple[Path, dict]:
    """Rendered by two worker processes (as the default size is), not in-process."""
    root = tmp_path_factory.mktemp("glyphs_a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "_MIN_IMAGES_FOR_WORKERS", 0)
        return root, prepare_glyphs(root, seed=0, size="small", workers=2)


@pytest.fixture(scope="module")
def build_b(tmp_path_factory) -> tuple[Path, dict]:
    """Same seed as build_a, rendered in one process instead of two."""
    root = tmp_path_factory.mktemp("glyphs_b")
    return root, prepare_glyphs(root, seed=0, size="small", workers=1)


@pytest.fixture(scope="module")
def build_c(tmp_path_factory) -> tuple[Path, dict]:
    """Another seed, into a root that holds a stale, half-written dataset."""
    root = tmp_path_factory.mktemp("glyphs_c")
    (root / "glyphs" / "train").mkdir(parents=True)
    (root / "glyphs" / "stale.txt").write_text("left over from an interrupted run")
    return root, prepare_glyphs(root, seed=1, size="small")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _classes(root: Path) -> dict[str, list[str]]:
    return {s: sorted(d.name for d in (root / "glyphs" / s).iterdir()) for s in SPLITS}


def test_same_seed_gives_identical_files(build_a, build_b):
    files_a, files_b = _files(build_a[0]), _files(build_b[0])
    assert files_a.keys() == files_b.keys()
    differing = [k for k in files_a if files_a[k] != files_b[k]]
    assert differing == []


def test_other_seed_gives_other_samples(build_a, build_c):
    files_a, files_c = _files(build_a[0]), _files(build_c[0])
    pngs = [k for k in files_a if k.endswith(".png") and k.startswith("glyphs/")]
    same = [k for k in pngs if files_c.get(k) == files_a[k]]
    assert len(same) < 0.05 * len(pngs)
    assert _classes(build_a[0]) != _classes(build_c[0])


def test_rebuild_replaces_stale_output_and_leaves_no_temp_folders(build_c):
    root, result = build_c
    assert not result["cached"]
    assert not (root / "glyphs" / "stale.txt").exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".glyphs.lock")) == [
        "glyphs",
        "glyphs-retrieval",
    ]


def test_splits_are_disjoint_with_64_16_20_proportion(build_a):
    root, result = build_a
    classes = _classes(root)
    assert {s: len(c) for s, c in classes.items()} == {"train": 64, "val": 16, "test": 20}
    assert result["n_classes"] == {"train": 64, "val": 16, "test": 20}
    sets = [set(classes[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    meta = json.loads((root / "glyphs" / "classes.json").read_text(encoding="utf-8"))
    assert {f: m["split"] for f, m in meta.items()} == {f: s for s in SPLITS for f in classes[s]}
    for folder, m in meta.items():
        assert folder == f"U+{ord(m['char']):04X}"
        assert m["n_fonts"] >= gf.MIN_FONTS


def test_images_are_32x32_grey_and_enough_for_5shot_15query(build_a):
    root, result = build_a
    counts = set()
    n = 0
    for split in SPLITS:
        for class_dir in (root / "glyphs" / split).iterdir():
            images = sorted(class_dir.glob("*.png"))
            counts.add(len(images))
            for path in images:
                with Image.open(path) as img:
                    assert img.size == (32, 32) and img.mode == "L", path
                    arr = np.asarray(img)
                # visible strokes on a dark background under the few-shot noise (std 40)
                assert arr.max() > 128 and np.median(arr) < 64, path
                n += 1
    assert counts == {20}
    assert n == result["n_images"] == 2000


def test_val_episodes_have_sib_structure_and_point_into_val(build_a):
    root, _ = build_a
    val_dir = root / "glyphs" / "val"
    val_files = {f"{p.parent.name}/{p.name}" for p in val_dir.rglob("*.png")}
    for n_shot in (1, 5):
        episodes = json.loads((root / "glyphs" / f"val_episodes_{n_shot}shot.json").read_text())
        assert isinstance(episodes, list) and len(episodes) == 50
        for ep in episodes:
            assert set(ep) == {"Support", "Query"}
            assert len(ep["Support"]) == len(ep["Query"]) == 5
            way_classes = []
            for support, query in zip(ep["Support"], ep["Query"]):
                assert len(support) == n_shot and len(query) == 15
                paths = support + query
                assert len(set(paths)) == len(paths)
                assert set(paths) <= val_files
                assert len({p.split("/")[0] for p in paths}) == 1
                way_classes.append(paths[0].split("/")[0])
            assert len(set(way_classes)) == 5


def test_episodes_read_by_fewshot_reader(build_a):
    fewshot = pytest.importorskip("storage.fewshot")
    root, _ = build_a
    split = fewshot.list_split(root / "glyphs", "val")
    episodes = fewshot.read_episode_json(root / "glyphs" / "val_episodes_5shot.json", split)
    assert len(episodes) == 50 and episodes[0].support.shape == (5, 5) and episodes[0].query.shape == (5, 15)


class _NoClasses(pickle.Unpickler):
    def find_class(self, module, name):
        raise AssertionError(f"ground truth pickle references {module}.{name}")


def test_retrieval_ground_truth_is_plain_and_consistent(build_a):
    root, result = build_a
    test_dir = root / "glyphs-retrieval" / "test"
    raw = (test_dir / GND_NAME).read_bytes()
    assert raw[:2] == b"\x80\x04"  # protocol 4
    gnd = _NoClasses(io.BytesIO(raw)).load()
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert len(qimlist) == len(gnd["gnd"]) == 20 and len(imlist) == 500
    assert result["n_retrieval"] == {"train_clusters": 64, "train_images": 320, "queries": 20, "database": 500}
    for name in imlist + qimlist:
        assert (test_dir / "jpg" / f"{name}.png").is_file() and "." not in name
    for entry in gnd["gnd"]:
        assert set(entry) == {"easy", "hard", "junk", "bbx"}
        ids = entry["easy"] + entry["hard"] + entry["junk"]
        assert all(type(i) is int and 0 <= i < len(imlist) for i in ids)
        assert len(set(ids)) == len(ids)
        assert len(entry["easy"]) + len(entry["hard"]) >= 1
        assert len(entry["bbx"]) == 4 and all(type(v) is float for v in entry["bbx"])
        x0, y0, x1, y1 = entry["bbx"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    # the stored labels follow the documented rule applied to the stored metadata
    meta = json.loads((test_dir / "metadata.json").read_text(encoding="utf-8"))
    assert [d["name"] for d in meta["database"]] == imlist
    for q, entry in zip(meta["queries"], gnd["gnd"]):
        for label in ("easy", "hard", "junk"):
            assert all(gr.label_for(q, meta["database"][i], gf.family_of) == label for i in entry[label])
    # distractors come from characters that are not queried
    queried = {q["char"] for q in meta["queries"]}
    assert any(d["char"] not in queried for d in meta["database"])


def test_retrieval_train_clusters_are_the_fewshot_train_classes(build_a):
    root, _ = build_a
    clusters = sorted(d.name for d in (root / "glyphs-retrieval" / "train").iterdir())
    assert clusters == _classes(root)["train"]
    assert all(len(list((root / "glyphs-retrieval" / "train" / c).glob("*.png"))) == 5 for c in clusters)


def test_rerun_is_cached_and_touches_nothing(build_a):
    root, _ = build_a
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.perf_counter()
    result = prepare_glyphs(root, seed=0, size="small")
    assert time.perf_counter() - start < 1.0
    assert result["cached"] and result["n_classes"] == {"train": 64, "val": 16, "test": 20}
    assert result["fewshot_root"] == str(root / "glyphs")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_no_lookalike_characters_are_kept(build_a):
    pool = {c.char for c in gf.class_pool(gf.load_fonts())}
    assert "A" in pool and "\u0391" not in pool and "\u0410" not in pool  # Latin, Greek, Cyrillic A
    assert "o" in pool and "\u03bf" not in pool and "\u043e" not in pool  # Latin, Greek, Cyrillic o
    assert "." in pool and "\u00b7" not in pool  # full stop / middle dot
    assert "o" in pool and "O" in pool  # case pairs stay
    assert len(pool) >= 1200
    meta = json.loads((build_a[0] / "glyphs" / "classes.json").read_text(encoding="utf-8"))
    assert {m["char"] for m in meta.values()} <= pool


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"char": "B"}, None),
        ({}, "easy"),
        ({"font": "DejaVuSans-Bold.ttf"}, "easy"),
        ({"font": "STIXGeneral.ttf"}, "hard"),
        ({"aug": {"rotation_deg": 20.0}}, "hard"),
        ({"aug": {"scale": 1.2}}, "hard"),
        ({"removed": 0.2}, "hard"),
        ({"removed": 0.5}, "junk"),
        ({"aug": {"rotation_deg": -90.0}}, "junk"),
    ],
)
def test_ground_truth_rule(item, expected):
    query = {"char": "A", "font": "DejaVuSans.ttf", "aug": {}}
    full = {"char": "A", "font": "DejaVuSans-Oblique.ttf", "removed": 0.0, **item}
    full["aug"] = {
        "rotation_deg": 5.0,
        "scale": 1.05,
        "shear": 0.1,
        "dx": 1.0,
        "dy": -2.0,
        "stroke": 1,
        "occlusion": None,
        **item.get("aug", {}),
    }
    assert gr.label_for(query, full, gf.family_of) == expected


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="size"):
        prepare_glyphs(tmp_path, size="huge")
    with pytest.raises(ValueError, match="seed"):
        prepare_glyphs(tmp_path, seed=-1, size="small")
