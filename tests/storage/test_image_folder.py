"""Few-shot on a user's image folder: mixed formats, modes and sizes."""

import json

import numpy as np
import pytest
from PIL import Image

from storage.errors import CorruptFileError, DatasetLayoutError, DataValueError
from storage.fewshot import list_split, load_images
from storage.image_folder import channel_stats, folder_spec, image_folder_spec, parse_normalization, verify_images

# (mode, extension, size): every class folder gets one of each
KINDS = [
    ("RGB", "png", (40, 30)),
    ("RGBA", "png", (25, 50)),
    ("L", "jpg", (64, 64)),
    ("P", "gif", (17, 23)),
    ("CMYK", "jpg", (33, 20)),
    ("RGB", "jpeg", (90, 60)),
]


def _image(mode, size, rng):
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def _folder(root, classes=("cat", "dog"), seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i, (mode, ext, size) in enumerate(KINDS):
                _image(mode, size, rng).save(d / f"{i}.{ext}")
    return root


def _expected_stats(root, size):
    pixels = []
    for f in sorted((root / "train").rglob("*.*")):
        with Image.open(f) as img:
            pixels.append(
                np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), np.float64).reshape(-1, 3)
            )
    x = np.concatenate(pixels) / 255.0
    return x.mean(axis=0), x.std(axis=0)


def test_spec_of_mixed_images_and_auto_stats(tmp_path):
    root = _folder(tmp_path / "pets")
    spec = image_folder_spec(root, image_size=32, cache_dir=tmp_path / "cache")
    assert (spec.channels, spec.image_size, spec.resize, spec.center_crop) == (3, 32, (32, 32), None)
    assert spec.train.crop == "random-resized" and spec.train.size == 32 and spec.train.flip
    assert folder_spec(32, spec.mean, spec.std) == spec
    mean, std = _expected_stats(root, 32)
    np.testing.assert_allclose(spec.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(spec.std, std, rtol=1e-6)
    cached = list((tmp_path / "cache").glob("image-stats-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["n_images"] == 12
    assert not list(root.rglob("*.json"))  # nothing written into the user's folder
    # the cache is used: change it and the spec follows; a new image size is another key
    obj = json.loads(cached[0].read_text())
    cached[0].write_text(json.dumps({**obj, "mean": [0.1, 0.2, 0.3]}))
    assert image_folder_spec(root, image_size=32, cache_dir=tmp_path / "cache").mean == (0.1, 0.2, 0.3)
    image_folder_spec(root, image_size=16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("image-stats-*.json"))) == 2
    # every image loads through the paper's data path, test transforms and augmentation
    index = list_split(root, "val")
    x = load_images(index, index.paths, spec)
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    xa = load_images(index, index.paths, spec, rng=np.random.default_rng(0))
    assert xa.shape == (12, 3, 32, 32)
    verify_images(index)


def test_normalization_choices(tmp_path):
    root = _folder(tmp_path / "pets")
    assert image_folder_spec(root, 24, "imagenet").std == (0.229, 0.224, 0.225)
    assert image_folder_spec(root, 24, "0.5,0.25").mean == (0.5, 0.5, 0.5)
    spec = image_folder_spec(root, 24, "0.1,0.2,0.3,0.4,0.5,0.6")
    assert spec.mean == (0.1, 0.2, 0.3) and spec.std == (0.4, 0.5, 0.6)
    assert parse_normalization("AUTO") is None
    for bad, message in [
        ("0.5", "has 1 numbers"),
        ("0.1,0.2,0.3,0.4", "has 4 numbers"),
        ("x,y", "not understood"),
        ("0.5,0", "std must be > 0"),
        ("120,60", "0-255 scale"),
        ("cifar", "not understood"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_normalization(bad)


def test_unreadable_image_is_named(tmp_path):
    root = _folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CorruptFileError, match=r"broken\.png: not a readable image"):
        image_folder_spec(root, 24, cache_dir=tmp_path / "c")
    spec = image_folder_spec(root, 24, "imagenet")  # no stats: the image is only read when loaded
    index = list_split(root, "train")
    with pytest.raises(CorruptFileError, match=r"broken\.png: not a readable image"):
        load_images(index, index.paths, spec)
    with pytest.raises(CorruptFileError, match=r"broken\.png"):
        verify_images(index)


def test_layout_errors(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "val" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetLayoutError, match=r"val/cat/notes\.txt: not an image file"):
        image_folder_spec(root, 24, "imagenet")
    (root / "val" / "cat" / "notes.txt").unlink()
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DatasetLayoutError, match=r"test/dog: class 'dog' has no images"):
        image_folder_spec(root, 24, "imagenet")
    empty = _folder(tmp_path / "e")
    for d in (empty / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with pytest.raises(DatasetLayoutError, match=r"e/val: split is empty"):
        image_folder_spec(empty, 24, "imagenet")
    with pytest.raises(DatasetLayoutError, match=r"missing: image folder not found"):
        image_folder_spec(tmp_path / "missing")


def test_constant_images_have_no_auto_std(tmp_path):
    root = tmp_path / "flat"
    for split in ("train", "val", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (10, 10), (7, 7, 7)).save(root / split / "a" / "x.png")
    with pytest.raises(DataValueError, match=r"flat/train: channel 0 has the same value in every pixel"):
        channel_stats(list_split(root, "train"), 8)
