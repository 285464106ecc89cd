"""Few-shot datasets in the folder layout ``<root>/<split>/<class>/<image>``, their
normalisation specs and the SIB fixed-episode JSON format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage.augment import TrainTransform, augment
from storage.errors import CorruptFileError, DatasetLayoutError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class DatasetSpec:
    """How images of a data set are turned into network input (the authors' ``dataset.py``).

    Test transforms run in this order: ``resize`` to exactly (height, width) (bilinear, as
    torchvision's ``Resize([h, w])``), ``center_crop`` (square), then scaling to [0, 1] and
    normalisation ``(x - mean) / std`` per channel. After them the image must be
    ``image_size`` square. ``train`` is the augmentation that replaces the test transforms
    when features are computed for SSR training (``storage.augment``).
    """

    name: str
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: TrainTransform
    resize: tuple[int, int] | None = None
    center_crop: int | None = None


def _div255(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(v / 255.0 for v in values)


# Mean and std (x 1/255) exactly as in the authors' src/dataset.py (SSR_METHOD.md section 8
# rounds them to two decimals).
DATASET_SPECS: dict[str, DatasetSpec] = {
    "cifar-fs": DatasetSpec(
        "cifar-fs",
        32,
        3,
        _div255((129.37731888, 124.10583864, 112.47758569)),
        _div255((68.20947949, 65.43124043, 70.45866994)),
        train=TrainTransform("random", 32, padding=4, flip=True, jitter=0.4),
    ),
    "mini-imagenet": DatasetSpec(
        "mini-imagenet",
        80,
        3,
        _div255((120.39586422, 115.59361427, 104.54012653)),
        _div255((70.68188272, 68.27635443, 72.54505529)),
        train=TrainTransform("random", 80, padding=8, flip=True, jitter=0.4),
        center_crop=80,
    ),
    "tiered-imagenet": DatasetSpec(
        "tiered-imagenet",
        84,
        3,
        _div255((125.3, 123.0, 113.9)),
        _div255((63.0, 62.1, 66.7)),
        train=TrainTransform("random-resized", 84, flip=True),
        resize=(92, 92),
        center_crop=84,
    ),
    "glyphs": DatasetSpec("glyphs", 32, 1, (0.5,), (0.5,), train=TrainTransform("random", 32, padding=4, flip=False)),
}


@dataclass
class SplitIndex:
    """The images of one split.

    root: the split folder (``<root>/<split>``); paths: image paths relative to it,
    ``<class>/<image>``, sorted; labels: (N,) int64 index into ``classes``; classes:
    class folder names, sorted.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    _lookup: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self, rel_path: str) -> int | None:
        """Index of ``rel_path`` (``<class>/<image>``) or None if it is not in the split."""
        if self._lookup is None:
            self._lookup = {p: i for i, p in enumerate(self.paths)}
        return self._lookup.get(rel_path)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_split(root: str | os.PathLike, split: str) -> SplitIndex:
    """Index ``<root>/<split>/<class>/<image>``: classes and paths sorted by name."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"{split_dir}: split folder not found (expected <root>/{split}/<class>/<image>)")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetLayoutError(f"{split_dir}: split is empty (expected one folder per class)")
    paths: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(f.name for f in class_dir.iterdir() if f.is_file() and _is_image(f.name))
        if not images:
            raise DatasetLayoutError(
                f"{class_dir}: class '{class_dir.name}' has no images "
                f"(expected files ending in {', '.join(IMAGE_EXTENSIONS[:3])}, ...)"
            )
        paths.extend(f"{class_dir.name}/{name}" for name in images)
        labels.extend([label] * len(images))
    return SplitIndex(split_dir, paths, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs])


def _transform(img: Image.Image, spec: DatasetSpec, source: Path, rng: np.random.Generator | None) -> np.ndarray:
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if rng is not None:
        img = augment(img, spec.train, rng)
    else:
        if spec.resize is not None:
            h, w = spec.resize
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        if spec.center_crop is not None:
            c = spec.center_crop
            w, h = img.size
            if w < c or h < c:
                raise DatasetLayoutError(f"{source}: image is {w}x{h}, smaller than center crop {c}")
            top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
            img = img.crop((left, top, left + c, top + c))
    if img.size != (spec.image_size, spec.image_size):
        w, h = img.size
        raise DatasetLayoutError(
            f"{source}: image is {w}x{h} after transforms, expected "
            f"{spec.image_size}x{spec.image_size} for dataset '{spec.name}'"
        )
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1)


def load_images(
    split: SplitIndex | str | os.PathLike,
    rel_paths: Sequence[str],
    spec: DatasetSpec,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Read, transform and normalise images.

    split: a SplitIndex or the split folder; rel_paths: B paths relative to it; rng: when
    given, the training augmentation ``spec.train`` drawn from it replaces the test
    transforms. Returns (B, C, H, W) float32 with C = spec.channels, H = W = spec.image_size.
    """
    root = split.root if isinstance(split, SplitIndex) else Path(split)
    out = np.empty((len(rel_paths), spec.channels, spec.image_size, spec.image_size), dtype=np.float32)
    for i, rel in enumerate(rel_paths):
        path = root / rel
        try:
            with Image.open(path) as img:
                out[i] = _transform(img, spec, path, rng)
        except FileNotFoundError:
            raise DatasetLayoutError(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise CorruptFileError(f"{path}: not a readable image ({exc})") from exc
    return out


@dataclass(frozen=True)
class Episode:
    """One few-shot task as indices into a SplitIndex.

    support: (n_way, n_shot) int64; query: (n_way, n_query) int64. Row w holds images of
    the episode's w-th class.
    """

    support: np.ndarray
    query: np.ndarray


def _resolve(split: SplitIndex, raw: object, json_path: Path, ep_no: int, key: str, source: str) -> int:
    if not isinstance(raw, str):
        raise DatasetLayoutError(f"{json_path}: episode {ep_no}: {key} entry {raw!r} is not a path string")
    parts = [p for p in raw.replace("\\", "/").split("/") if p and p != "."]
    # Accept `<class>/<image>` and any prefix before it (`val/<class>/<image>`, absolute paths).
    for start in range(len(parts) - 1):
        idx = split.index_of("/".join(parts[start:]))
        if idx is not None:
            return idx
    raise DatasetLayoutError(f"{json_path}: episode {ep_no}: {key} image '{raw}' not found in {source}")


def _rows(obj: dict, key: str, json_path: Path, ep_no: int) -> list[list]:
    rows = obj.get(key)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise DatasetLayoutError(
            f"{json_path}: episode {ep_no}: '{key}' must be a non-empty list "
            "of non-empty lists of image paths (one list per class)"
        )
    if len({len(r) for r in rows}) != 1:
        raise DatasetLayoutError(
            f"{json_path}: episode {ep_no}: '{key}' rows have different lengths {[len(r) for r in rows]}"
        )
    return rows


def read_episode_json(
    json_path: str | os.PathLike, split: SplitIndex, *, limit: int | None = None, source: str | None = None
) -> list[Episode]:
    """Read SIB fixed episodes: a JSON list of ``{"Support": [[path] * n_shot] * n_way,
    "Query": [[path] * n_query] * n_way}``, paths relative to the split folder (any prefix
    before ``<class>/<image>`` is accepted).

    The one reader of this format; ``split`` may also index the rows of a features table
    (their paths, labels and classes). limit: read only the first ``limit`` episodes
    (None: all). source: what the paths are looked up in, for error messages (default: the
    split folder). Every way must hold one class; episodes may differ in n_way, n_shot and
    n_query. Raises DatasetLayoutError / CorruptFileError naming the file, the episode and
    what was expected.
    """
    json_path = Path(json_path)
    source = source or str(split.root)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetLayoutError(f"{json_path}: episode file not found") from None
    except OSError as exc:
        raise DatasetLayoutError(f"{json_path}: episode file not readable ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{json_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not data:
        got = "an empty list" if isinstance(data, list) else type(data).__name__
        raise DatasetLayoutError(f"{json_path}: expected a non-empty JSON list of episodes, got {got}")
    episodes: list[Episode] = []
    for ep_no, obj in enumerate(data[:limit]):
        if not isinstance(obj, dict):
            raise DatasetLayoutError(f"{json_path}: episode {ep_no}: expected an object with 'Support' and 'Query'")
        support_rows, query_rows = _rows(obj, "Support", json_path, ep_no), _rows(obj, "Query", json_path, ep_no)
        if len(support_rows) != len(query_rows):
            raise DatasetLayoutError(
                f"{json_path}: episode {ep_no}: 'Support' has {len(support_rows)} "
                f"classes, 'Query' has {len(query_rows)}"
            )
        support = np.array(
            [[_resolve(split, p, json_path, ep_no, "Support", source) for p in r] for r in support_rows], dtype=np.int64
        )
        query = np.array(
            [[_resolve(split, p, json_path, ep_no, "Query", source) for p in r] for r in query_rows], dtype=np.int64
        )
        for w in range(len(support)):
            labels = np.unique(np.concatenate([split.labels[support[w]], split.labels[query[w]]]))
            if len(labels) != 1:
                names = [split.classes[i] for i in labels]
                raise DatasetLayoutError(f"{json_path}: episode {ep_no}: way {w} mixes classes {names}")
        episodes.append(Episode(support, query))
    return episodes


def data_identity(root: str | os.PathLike) -> str:
    """What names the outputs derived from a dataset folder: its resolved path, plus the
    content of its ``dataset.json`` where it has one (the built-in glyphs: seed, size and
    generator version), because a rendering with other settings replaces the folder in place."""
    root = Path(root).resolve()
    try:
        manifest = (root / "dataset.json").read_text(encoding="utf-8")
    except OSError:
        return str(root)
    return f"{root}#{manifest}"


def val_episodes_name(n_way: int = 5, n_shot: int = 1, n_query: int = 15) -> str:
    """The authors' name of a dataset's fixed validation episodes, e.g.
    ``val1000Episode_5_way_1_shot_15_query.json`` (placed at the dataset root)."""
    return f"val1000Episode_{n_way}_way_{n_shot}_shot_{n_query}_query.json"


def find_val_episodes(root: str | os.PathLike, n_way: int = 5, n_shot: int = 1, n_query: int = 15) -> Path | None:
    """``<root>/val1000Episode_<n_way>_way_<n_shot>_shot_<n_query>_query.json`` when the
    dataset folder holds it (CIFAR-FS, mini- and tiered-ImageNet as the authors lay them
    out), else None."""
    path = Path(root) / val_episodes_name(n_way, n_shot, n_query)
    return path if path.is_file() else None
