"""CIFAR-FS built from the CIFAR-100 python pickles the way the SSR/SIB authors build it.

Their ``data/get_cifarfs.py`` and ``data/download_cifar_fs.sh`` produce::

    cifar-fs/{train,val,test}/<fine label>/<name>.jpg     JPEG, PIL's default settings
    cifar-fs/val1000Episode_5_way_1_shot_15_query.json    (and the other val1000* JSONs of
                                                           the splits archive, except the
                                                           two without ``_query``)

Details that matter for the published episode files and backbones, reproduced here:

- pickles are read in the order ``test`` then ``train``; a row's picture is the 3072 bytes
  R, G, B planes of 32 x 32, saved as JPEG under its ``filenames`` entry with ``.png``
  replaced by ``.jpg``, in the folder of its fine label;
- their loop keeps its own row counter and does not advance it when the target file
  already exists, so after a repeated name the following names are paired with the rows
  before them (and the batch's last row is not written). The same pairing is kept here,
  so that a name in their episode files always means the same picture;
- classes listed in no split file are dropped.

The result is built in a temporary folder next to ``out_dir``, checked (every episode
file must name images of the ``val`` split), then renamed into place; on any error
nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from storage.errors import DatasetLayoutError, SchemaError, StorageError
from storage.fewshot import list_split, read_episode_json
from storage.safe_pickle import safe_load, str_keys

SPLITS = ("train", "val", "test")
PICKLE_ORDER = ("test", "train")  # get_cifarfs.py handles the test pickle first
# download_cifar_fs.sh deletes these two after moving val1000* into cifar-fs/.
DROPPED_EPISODE_FILES = ("val1000Episode_5_way_1_shot.json", "val1000Episode_5_way_5_shot.json")


def find_split_lists(splits_dir: Path) -> dict[str, Path]:
    """``{split: <folder>/<split>.txt}`` of the first folder holding all three lists."""
    for train in sorted(Path(splits_dir).rglob("train.txt")):
        d = train.parent
        if all((d / f"{s}.txt").is_file() for s in SPLITS):
            return {s: d / f"{s}.txt" for s in SPLITS}
    raise DatasetLayoutError(f"{splits_dir}: no folder with train.txt, val.txt and test.txt class lists")


def episode_files(splits_dir: Path) -> list[Path]:
    """The fixed-episode JSONs the authors move into ``cifar-fs/`` (``val1000*`` minus two)."""
    found = sorted(p for p in Path(splits_dir).rglob("val1000*") if p.is_file())
    return [p for p in found if p.name not in DROPPED_EPISODE_FILES]


def _read_pickle(path: Path, keys: tuple[str, ...]) -> dict:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: CIFAR-100 file not found")
    obj = str_keys(safe_load(path))
    if not isinstance(obj, dict):
        raise SchemaError(f"{path}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SchemaError(f"{path}: missing key(s) {missing} (expected {list(keys)})")
    return obj


def _text(v: str | bytes) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _class_splits(lists: dict[str, Path], names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for split, path in lists.items():
        for cls in path.read_text().split():
            if cls not in names:
                raise DatasetLayoutError(
                    f"{path}: class '{cls}' is not a CIFAR-100 fine label (expected one of meta's fine_label_names)"
                )
            out[cls] = split
    return out


def _write_pickle_images(path: Path, names: list[str], class_split: dict[str, str], out: Path) -> int:
    """Write the JPEGs of one CIFAR-100 pickle; returns how many files were written."""
    data = _read_pickle(path, ("data", "fine_labels", "filenames"))
    images = np.asarray(data["data"], dtype=np.uint8)
    labels, filenames = list(data["fine_labels"]), list(data["filenames"])
    if images.ndim != 2 or images.shape[1] != 3072:
        raise SchemaError(f"{path}: data has shape {images.shape}, expected (N, 3072)")
    if not len(labels) == len(filenames) == len(images):
        raise SchemaError(
            f"{path}: data has {len(images)} rows, fine_labels {len(labels)}, "
            f"filenames {len(filenames)}; expected the same length"
        )
    row, written = 0, 0
    for raw_name in filenames:
        label = int(labels[row])
        if not 0 <= label < len(names):
            raise SchemaError(f"{path}: fine_labels[{row}] is {label}, expected 0..{len(names) - 1}")
        cls = names[label]
        target = out / class_split.get(cls, ".dropped") / cls / (os.path.splitext(_text(raw_name))[0] + ".jpg")
        if target.exists():
            continue  # as get_cifarfs.py: the row counter is not advanced
        target.parent.mkdir(parents=True, exist_ok=True)
        picture = images[row].reshape(3, 32, 32).transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(picture), "RGB").save(target, format="JPEG")
        row += 1
        written += 1
    return written


def check_episode_file(json_path: Path, root: Path) -> int:
    """Raise DatasetLayoutError unless every image named by the fixed episodes of
    ``json_path`` is in ``<root>/val``; returns the number of episodes."""
    return len(read_episode_json(json_path, list_split(root, "val")))


def _check(tmp: Path, out: Path, splits: Path) -> None:
    """Layout and episode checks of the folder built in ``tmp``; errors name ``out``."""
    try:
        for split in SPLITS:
            list_split(tmp, split)  # every split has classes with images
        for js in episode_files(splits):
            check_episode_file(js, tmp)
    except StorageError as exc:
        raise type(exc)(str(exc).replace(str(tmp), str(out))) from None


def build_cifar_fs(cifar100_dir: str | os.PathLike, splits_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Build ``out_dir`` (``cifar-fs``) from ``cifar100_dir`` (``meta``, ``train``,
    ``test`` pickles) and ``splits_dir`` (class lists and fixed episodes)."""
    cifar, splits, out = Path(cifar100_dir), Path(splits_dir), Path(out_dir)
    lists = find_split_lists(splits)
    meta = _read_pickle(cifar / "meta", ("fine_label_names",))
    names = [_text(n) for n in meta["fine_label_names"]]
    class_split = _class_splits(lists, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for part in PICKLE_ORDER:
            _write_pickle_images(cifar / part, names, class_split, tmp)
        shutil.rmtree(tmp / ".dropped", ignore_errors=True)
        _check(tmp, out, splits)
        for js in episode_files(splits):
            shutil.copyfile(js, tmp / js.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
