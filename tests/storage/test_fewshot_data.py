import json

import numpy as np
import pytest
from PIL import Image

from storage.augment import TrainTransform, augment
from storage.errors import CorruptFileError, DatasetLayoutError
from storage.fewshot import DATASET_SPECS, list_split, load_images, read_episode_json


def make_split(root, split="val", n_classes=4, n_images=6, size=32, mode="RGB"):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n_images):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"img{i:02d}.png")
    return root


def test_specs_follow_the_table():
    cifar = DATASET_SPECS["cifar-fs"]
    assert cifar.image_size == 32 and cifar.channels == 3 and cifar.resize is None and cifar.center_crop is None
    # the authors' constants, not the two-decimal ones of the paper's table
    assert cifar.mean == tuple(v / 255 for v in (129.37731888, 124.10583864, 112.47758569))
    assert cifar.std == tuple(v / 255 for v in (68.20947949, 65.43124043, 70.45866994))
    mini = DATASET_SPECS["mini-imagenet"]
    assert mini.mean == tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
    assert mini.std == tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))
    assert (mini.resize, mini.center_crop, mini.image_size) == (None, 80, 80)
    tiered = DATASET_SPECS["tiered-imagenet"]
    assert (tiered.resize, tiered.center_crop, tiered.image_size) == ((92, 92), 84, 84)
    assert tiered.mean == tuple(v / 255 for v in (125.3, 123.0, 113.9))
    assert (cifar.train, mini.train, tiered.train) == (
        TrainTransform("random", 32, padding=4, flip=True, jitter=0.4),
        TrainTransform("random", 80, padding=8, flip=True, jitter=0.4),
        TrainTransform("random-resized", 84, flip=True, jitter=0.0),
    )
    glyphs = DATASET_SPECS["glyphs"]
    assert (glyphs.channels, glyphs.mean, glyphs.std, glyphs.image_size) == (1, (0.5,), (0.5,), 32)


def test_list_split_and_load(tmp_path):
    make_split(tmp_path)
    idx = list_split(tmp_path, "val")
    assert idx.classes == ["class0", "class1", "class2", "class3"]
    assert len(idx) == 24 and idx.paths[0] == "class0/img00.png" and idx.labels.dtype == np.int64
    assert list(np.bincount(idx.labels)) == [6, 6, 6, 6]
    x = load_images(idx, idx.paths[:3], DATASET_SPECS["cifar-fs"])
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    raw = np.asarray(Image.open(tmp_path / "val" / idx.paths[0]), dtype=np.float32) / 255
    spec = DATASET_SPECS["cifar-fs"]
    np.testing.assert_allclose(x[0, 1], (raw[:, :, 1] - spec.mean[1]) / spec.std[1], rtol=1e-5)
    grey = load_images(idx.root, idx.paths[:2], DATASET_SPECS["glyphs"])
    assert grey.shape == (2, 1, 32, 32) and grey.min() >= -1 and grey.max() <= 1


def test_test_transforms_match_the_authors(tmp_path):
    """tiered: Resize([92, 92]) (both sides, aspect not kept) then CenterCrop(84); mini:
    CenterCrop(80) of the 84 px images; the pixels equal PIL's resize and crop."""
    rng = np.random.default_rng(1)
    (tmp_path / "val" / "c").mkdir(parents=True)
    wide = rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "val" / "c" / "wide.png")
    Image.fromarray(wide[:84, :84]).save(tmp_path / "val" / "c" / "mini.png")
    tiered = DATASET_SPECS["tiered-imagenet"]
    got = load_images(tmp_path / "val", ["c/wide.png"], tiered)[0]
    want = np.asarray(Image.fromarray(wide).resize((92, 92), Image.BILINEAR).crop((4, 4, 88, 88)), np.float32) / 255
    np.testing.assert_allclose(
        got, ((want - np.float32(tiered.mean)) / np.float32(tiered.std)).transpose(2, 0, 1), rtol=1e-6, atol=1e-6
    )
    mini = DATASET_SPECS["mini-imagenet"]
    got = load_images(tmp_path / "val", ["c/mini.png"], mini)[0]
    want = wide[2:82, 2:82].astype(np.float32) / 255
    np.testing.assert_allclose(
        got, ((want - np.float32(mini.mean)) / np.float32(mini.std)).transpose(2, 0, 1), rtol=1e-6, atol=1e-6
    )


def test_training_augmentation_is_seeded_and_the_authors(tmp_path):
    make_split(tmp_path, n_classes=1, n_images=3)
    idx = list_split(tmp_path, "val")
    spec = DATASET_SPECS["cifar-fs"]
    a = load_images(idx, idx.paths, spec, rng=np.random.default_rng(5))
    b = load_images(idx, idx.paths, spec, rng=np.random.default_rng(5))
    c = load_images(idx, idx.paths, spec, rng=np.random.default_rng(6))
    plain = load_images(idx, idx.paths, spec)
    assert a.shape == plain.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    # RandomCrop(32, padding=4) without flip or jitter: a shifted copy with zero borders
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    crops = [
        np.asarray(augment(img, TrainTransform("random", 32, padding=4, flip=False), np.random.default_rng(s)))
        for s in range(20)
    ]
    assert all(c.shape == (32, 32, 3) and set(np.unique(c)) <= {0, 200} for c in crops)
    assert (
        len({int((c == 0).sum()) for c in crops}) > 1
        and max((c == 0).mean() for c in crops) <= 1 - (28 / 32) ** 2 + 1e-9
    )
    # ColorJitter(0.4, 0.4, 0.4) keeps a grey image grey and scales it by at most 1.4 (brightness)
    grey = Image.fromarray(np.full((32, 32, 3), 100, np.uint8))
    for s in range(10):
        out = np.asarray(augment(grey, TrainTransform("random", 32, flip=True, jitter=0.4), np.random.default_rng(s)))
        assert out.std() == 0 and 60 - 1 <= out.mean() <= 140 + 1
    # RandomResizedCrop(84) of any image gives 84 x 84
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8))
    for s in range(10):
        assert augment(big, DATASET_SPECS["tiered-imagenet"].train, np.random.default_rng(s)).size == (84, 84)


def test_resize_and_center_crop(tmp_path):
    make_split(tmp_path, n_classes=1, n_images=1, size=100)
    idx = list_split(tmp_path, "val")
    assert load_images(idx, idx.paths, DATASET_SPECS["tiered-imagenet"]).shape == (1, 3, 84, 84)
    assert load_images(idx, idx.paths, DATASET_SPECS["mini-imagenet"]).shape == (1, 3, 80, 80)
    with pytest.raises(DatasetLayoutError, match=r"img00\.png: image is 100x100 after transforms, expected 32x32"):
        load_images(idx, idx.paths, DATASET_SPECS["cifar-fs"])


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"train: split folder not found"):
        list_split(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetLayoutError, match="split is empty"):
        list_split(tmp_path, "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="class 'cat' has no images"):
        list_split(tmp_path, "train")


def test_missing_and_corrupt_image(tmp_path):
    make_split(tmp_path, n_classes=1, n_images=2)
    idx = list_split(tmp_path, "val")
    with pytest.raises(DatasetLayoutError, match=r"nope\.png: image not found"):
        load_images(idx, ["class0/nope.png"], DATASET_SPECS["cifar-fs"])
    (tmp_path / "val" / "class0" / "img00.png").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match=r"img00\.png: not a readable image"):
        load_images(idx, ["class0/img00.png"], DATASET_SPECS["cifar-fs"])


def test_episode_json_paths_and_prefixes(tmp_path):
    make_split(tmp_path, n_classes=4, n_images=5)
    idx = list_split(tmp_path, "val")
    episodes = [
        {
            "Support": [["class2/img00.png"], ["class0/img03.png"]],
            "Query": [["class2/img01.png", "class2/img04.png"], ["class0/img00.png", "class0/img02.png"]],
        },
        {
            "Support": [["/some/where/val/class1/img02.png"], ["val\\class3\\img00.png"]],
            "Query": [["./class1/img00.png"], ["val/class3/img01.png"]],
        },
    ]
    path = tmp_path / "val1000Episode_2_way_1_shot.json"
    path.write_text(json.dumps(episodes))
    back = read_episode_json(path, idx)
    assert len(back) == 2 and back[0].support.shape == (2, 1) and back[0].query.shape == (2, 2)
    for raw, ep in zip(episodes, back):
        for key, rows in (("Support", ep.support), ("Query", ep.query)):
            got = [[idx.paths[i] for i in row] for row in rows]
            want = [["/".join(p.replace("\\", "/").split("/")[-2:]) for p in row] for row in raw[key]]
            assert got == want


def test_episode_json_errors(tmp_path):
    make_split(tmp_path, n_classes=2, n_images=3)
    idx = list_split(tmp_path, "val")
    path = tmp_path / "eps.json"
    good = {
        "Support": [["class0/img00.png"], ["class1/img00.png"]],
        "Query": [["class0/img01.png"], ["class1/img01.png"]],
    }
    path.write_text(json.dumps([good, {**good, "Query": [["class0/img01.png"], ["class1/missing.png"]]}]))
    with pytest.raises(DatasetLayoutError, match=r"eps\.json: episode 1: Query image 'class1/missing.png' not found"):
        read_episode_json(path, idx)
    path.write_text(json.dumps([{**good, "Query": [["class0/img01.png"], ["class0/img02.png"]]}]))
    with pytest.raises(DatasetLayoutError, match=r"episode 0: way 1 mixes classes"):
        read_episode_json(path, idx)
    path.write_text(json.dumps([{"Support": good["Support"]}]))
    with pytest.raises(DatasetLayoutError, match=r"episode 0: 'Query' must be"):
        read_episode_json(path, idx)
    path.write_text("[{")
    with pytest.raises(CorruptFileError, match=r"eps\.json: not valid JSON"):
        read_episode_json(path, idx)
    path.write_text(json.dumps([good, {**good, "Support": [["class0/img00.png", 3], ["class1/img00.png", 4]]}]))
    with pytest.raises(DatasetLayoutError, match=r"episode 1: Support entry 3 is not a path string"):
        read_episode_json(path, idx)
    for content, got in (({"Support": []}, "dict"), ([], "an empty list")):
        path.write_text(json.dumps(content))
        with pytest.raises(
            DatasetLayoutError, match=rf"eps\.json: expected a non-empty JSON list of episodes, got {got}"
        ):
            read_episode_json(path, idx)
    with pytest.raises(DatasetLayoutError, match=r"absent\.json: episode file not found"):
        read_episode_json(tmp_path / "absent.json", idx)
    with pytest.raises(DatasetLayoutError, match=r"val: episode file not readable"):
        read_episode_json(tmp_path / "val", idx)


def test_episode_json_limit_and_source(tmp_path):
    make_split(tmp_path, n_classes=2, n_images=3)
    idx = list_split(tmp_path, "val")
    good = {
        "Support": [["class0/img00.png"], ["class1/img00.png"]],
        "Query": [["class0/img01.png"], ["class1/img01.png"]],
    }
    path = tmp_path / "eps.json"
    path.write_text(json.dumps([good, good, {"Support": "broken"}]))
    assert len(read_episode_json(path, idx, limit=2)) == 2  # episodes past the limit are not read
    path.write_text(json.dumps([{**good, "Query": [["class0/img01.png"], ["class1/gone.png"]]}]))
    with pytest.raises(DatasetLayoutError, match=rf"Query image 'class1/gone.png' not found in {tmp_path / 'val'}$"):
        read_episode_json(path, idx)
    with pytest.raises(
        DatasetLayoutError, match=r"Query image 'class1/gone.png' not found in feat.parquet, split 'val'$"
    ):
        read_episode_json(path, idx, source="feat.parquet, split 'val'")
