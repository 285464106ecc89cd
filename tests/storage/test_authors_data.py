"""CIFAR-FS and mini-ImageNet as the authors publish and build them, fetched over a
loopback HTTP server through ``ssr data download`` (fixtures: tests/authors_formats.py)."""

import io
import json

import numpy as np
from PIL import Image

from storage.cifar_fs import build_cifar_fs
from storage.cli import main as cli_main
from storage.fewshot import find_val_episodes, list_split, read_episode_json, val_episodes_name
from tests.authors_formats import TAR_FILTER, cifar_fixture, cifar_fs_splits_zip, episodes_json, mini_imagenet_zip

SPLITS = {
    "train": ["apple", "bear", "cattle", "crab", "dog"],
    "val": ["butterfly", "lion", "shark", "tiger", "whale"],
    "test": ["bus", "plain", "rose", "television", "tulip"],
}
NAMES = tuple(sorted(sum(SPLITS.values(), []) + ["maple_tree"]))  # maple_tree: in no split, dropped


def _jpeg_default(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _serve_cifar(server, fixture, episode_files):
    val = {c: fixture.filenames(c) for c in SPLITS["val"]}
    files = {name: episodes_json(val, 4, *shape) for name, shape in episode_files.items()}
    server.files["/cifar-100-python.tar.gz"] = fixture.tarball()
    server.files["/cifar-fs-splits.zip"] = cifar_fs_splits_zip(SPLITS, files)
    return val


def _download(name, root, url, capsys=None):
    code = cli_main(["data", "download", name, "--root", str(root), "--url", url])
    return code, (capsys.readouterr() if capsys else None)


def test_cifar_fs_is_built_as_the_authors_build_it(server, tmp_path, capsys):
    fixture = cifar_fixture(NAMES, per_class=8)
    _serve_cifar(
        server,
        fixture,
        {
            val_episodes_name(5, 1, 15): (5, 1, 15),
            val_episodes_name(5, 5, 10): (5, 5, 10),
            "val1000Episode_5_way_1_shot.json": (5, 1, 15),
            "val1000Episode_5_way_5_shot.json": (5, 5, 10),
        },
    )
    assert _download("cifar-100", tmp_path, server.url + "/cifar-100-python.tar.gz", capsys)[0] == 0
    assert not (tmp_path / "cifar-fs").exists()  # needs the split lists too
    assert _download("cifar-fs-splits", tmp_path, server.url + "/cifar-fs-splits.zip", capsys)[0] == 0
    root = tmp_path / "cifar-fs"
    # download_cifar_fs.sh keeps val1000* but the two files without "_query"
    assert sorted(p.name for p in root.iterdir()) == [
        "test",
        "train",
        "val",
        val_episodes_name(5, 1, 15),
        val_episodes_name(5, 5, 10),
    ]
    for split, classes in SPLITS.items():
        index = list_split(root, split)
        assert index.classes == sorted(classes) and len(index) == 16 * len(classes)
        assert all(p.endswith(".jpg") for p in index.paths)
    # every file is PIL's default JPEG of its row, named after the row's filename
    for part in ("test", "train"):
        data, labels, files = fixture.rows[part]
        for row in (0, 7, len(files) - 1):
            cls = NAMES[labels[row]]
            if cls == "maple_tree":
                continue
            split = next(s for s, c in SPLITS.items() if cls in c)
            path = root / split / cls / files[row].replace(".png", ".jpg")
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
            assert path.read_bytes() == _jpeg_default(fixture.picture(part, row))
    # the fixed validation episodes resolve and are found by their authors' name
    found = find_val_episodes(root)
    assert found == root / "val1000Episode_5_way_1_shot_15_query.json"
    episodes = read_episode_json(found, list_split(root, "val"))
    assert len(episodes) == 4 and episodes[0].support.shape == (5, 1) and episodes[0].query.shape == (5, 15)
    assert find_val_episodes(root, 5, 1, 10) is None


def test_a_repeated_file_name_keeps_the_authors_row_pairing(tmp_path):
    fixture = cifar_fixture(("apple", "bear", "cattle"), per_class=2)
    data, labels, files = fixture.rows["test"]
    files = list(files)
    files[3] = files[0]  # rows 0 and 3 are both apple: the second name exists already
    fixture.rows["test"] = (data, labels, files)
    (tmp_path / "cifar-100-python").mkdir()
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(fixture.tarball())) as tf:
        tf.extractall(tmp_path, **TAR_FILTER)
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, cls in zip(("train", "val", "test"), ("apple", "bear", "cattle")):
        (splits / f"{split}.txt").write_text(cls + "\n")
    root = build_cifar_fs(tmp_path / "cifar-100-python", splits, tmp_path / "cifar-fs")
    # get_cifarfs.py does not advance its row counter on a name that exists: name k+1 gets row k
    expected = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4}
    for name_pos, row in expected.items():
        cls = fixture.names[labels[row]]
        split = {"apple": "train", "bear": "val", "cattle": "test"}[cls]
        path = root / split / cls / files[name_pos].replace(".png", ".jpg")
        assert path.read_bytes() == _jpeg_default(fixture.picture("test", row)), name_pos
    assert len(list_split(root, "train")) + len(list_split(root, "val")) + len(list_split(root, "test")) == 5 + 6


def test_an_episode_file_naming_missing_images_is_refused_and_nothing_is_left(server, tmp_path, capsys):
    fixture = cifar_fixture(NAMES, per_class=8)
    val = _serve_cifar(server, fixture, {})
    bad = json.loads(episodes_json(val, 3, 5, 1, 15))
    bad[2]["Query"][1][4] = "lion/lion_s_999999.jpg"
    server.files["/cifar-fs-splits.zip"] = cifar_fs_splits_zip(SPLITS, {val_episodes_name(): json.dumps(bad)})
    assert _download("cifar-100", tmp_path, server.url + "/cifar-100-python.tar.gz", capsys)[0] == 0
    code, out = _download("cifar-fs-splits", tmp_path, server.url + "/cifar-fs-splits.zip", capsys)
    assert code == 2 and out.err.count("\n") == 1
    assert (
        "val1000Episode_5_way_1_shot_15_query.json: episode 2: Query image 'lion/lion_s_999999.jpg' not found"
        in out.err
        and str(tmp_path / "cifar-fs" / "val") in out.err
    )
    assert not (tmp_path / "cifar-fs").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary build left


def test_a_split_list_naming_an_unknown_class_is_refused(server, tmp_path, capsys):
    fixture = cifar_fixture(NAMES, per_class=2)
    _serve_cifar(server, fixture, {})
    server.files["/cifar-fs-splits.zip"] = cifar_fs_splits_zip({**SPLITS, "test": ["unicorn"]}, {})
    assert _download("cifar-fs-splits", tmp_path, server.url + "/cifar-fs-splits.zip", capsys)[0] == 0
    code, out = _download("cifar-100", tmp_path, server.url + "/cifar-100-python.tar.gz", capsys)
    assert code == 2 and "test.txt: class 'unicorn' is not a CIFAR-100 fine label" in out.err
    assert not (tmp_path / "cifar-fs").exists()


def test_mini_imagenet_zip_is_laid_out_as_download_miniimagenet_sh(server, tmp_path, capsys):
    counts = {"train_train": 3, "train_val": 1, "train_test": 1, "val": 5, "test": 5}
    probe = mini_imagenet_zip(counts, per_class=4)
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(probe)).namelist()
    val = {}
    for n in names:
        parts = n.split("/")
        if parts[1] == "val":
            val.setdefault(parts[2], []).append(parts[3])
    server.files["/Mini-ImageNet.zip"] = mini_imagenet_zip(
        counts, per_class=4, extra={val_episodes_name(5, 1, 3): episodes_json(val, 2, 5, 1, 3)}
    )
    code, out = _download("mini-imagenet", tmp_path, server.url + "/Mini-ImageNet.zip", capsys)
    assert code == 0
    root = tmp_path / "mini-imagenet"
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val", val_episodes_name(5, 1, 3)]
    train = list_split(root, "train")
    assert len(train.classes) == 3 and len(train) == 12
    with Image.open(train.root / train.paths[0]) as img:
        assert img.format == "JPEG" and img.size == (84, 84)
    found = find_val_episodes(root, 5, 1, 3)
    assert found is not None and len(read_episode_json(found, list_split(root, "val"))) == 2


def test_released_backbones_are_found_where_the_download_puts_them(server, tmp_path, capsys):
    import zipfile

    import pytest

    from storage.checkpoints import RELEASED_BACKBONES, released_backbone
    from storage.errors import StorageError

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the authors' zip: pre_trained_models/<Dataset>/<file>.pth
        for (dataset, _), rel in RELEASED_BACKBONES.items():
            if dataset != "tiered-imagenet":
                zf.writestr(f"pre_trained_models/{rel}", b"weights")
        zf.writestr("pre_trained_models/TieredImageNet/stale.pth", b"old")
    server.files["/pre_trained_models.zip"] = buf.getvalue()
    assert _download("fewshot-backbones", tmp_path, server.url + "/pre_trained_models.zip", capsys)[0] == 0
    root = tmp_path / "backbones"
    assert released_backbone(root, "cifar-fs", "wrn-28-10") == root / "CIFAR-FS" / "WRN_Cos_netFeatBest62.561.pth"
    assert released_backbone(root, "mini-imagenet", "conv4-64").read_bytes() == b"weights"
    with pytest.raises(
        StorageError,
        match=r"TieredImageNet/tieredImageNet_ResNet12\.pth: released backbone not found "
        r"\(run `ssr data download fewshot-backbones-tiered --root ",
    ):
        released_backbone(root, "tiered-imagenet", "resnet12")
    with pytest.raises(StorageError, match="no released conv4-64 backbone for dataset 'glyphs'"):
        released_backbone(root, "glyphs", "conv4-64")
