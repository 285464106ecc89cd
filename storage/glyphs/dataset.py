"""The built-in dataset: characters rendered from matplotlib's bundled fonts.

``prepare_glyphs(root)`` writes an Omniglot-like few-shot benchmark in the CIFAR-FS layout
with SIB-format fixed validation episodes, and a retrieval variant in the revisited-Oxford
layout, both from the same renderings (see docs/glyphs.md):

    <root>/glyphs/{train,val,test}/U+XXXX/U+XXXX_NN.png   32x32 'L', strokes light on 0
    <root>/glyphs/classes.json                            folder -> char, name, split, fonts
    <root>/glyphs/val_episodes_{1,5}shot.json             [{"Support": ..., "Query": ...}]
    <root>/glyphs/dataset.json                            seed, size, counts, version
    <root>/glyphs-retrieval/train/U+XXXX/U+XXXX_NN.png    clusters = training characters
    <root>/glyphs-retrieval/test/jpg/{query_NNN,db_NNNNN}.png
    <root>/glyphs-retrieval/test/gnd_glyphs-retrieval.pkl imlist, qimlist, gnd (easy/hard/junk/bbx)
    <root>/glyphs-retrieval/test/metadata.json            char, font, augmentation per image
    <root>/glyphs-retrieval/dataset.json

Every random choice comes from ``numpy.random.default_rng`` seeded by ``seed`` (and, per
character, by its code point), so one seed gives byte-identical files. The ground-truth
rule of the retrieval variant is in ``storage.glyphs.retrieval``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.glyphs import fonts as gf
from storage.glyphs import retrieval as gr
from storage.glyphs.render import Aug, GlyphRenderer, png_bytes, sample_fewshot_aug, sample_mild_aug

# 3: the test classes of size "default" hold 60 renderings (2 before, 20); the first 20 of
# every class are the version-2 files, byte for byte.
GENERATOR_VERSION = "3"
FEWSHOT_DIR = "glyphs"
RETRIEVAL_DIR = "glyphs-retrieval"
GND_NAME = "gnd_glyphs-retrieval.pkl"
SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
N_WAY, N_QUERY = 5, 15
# Starting worker processes costs about a second each; below this many images one process is faster.
_MIN_IMAGES_FOR_WORKERS = 8000


@dataclass(frozen=True)
class GlyphsSize:
    """How much to generate. images_per_class: few-shot renderings of a train or val class;
    test_images_per_class: of a test class (more, so that imbalanced Dirichlet query sets
    need no repeated image, see docs/glyphs.md); per_query: (easy, hard, junk) database
    designs per query."""

    n_classes: int
    images_per_class: int
    test_images_per_class: int
    n_val_episodes: int
    n_queries: int
    n_database: int
    train_per_cluster: int
    per_query: tuple[int, int, int]


SIZES = {
    "small": GlyphsSize(
        n_classes=100,
        images_per_class=20,
        test_images_per_class=20,
        n_val_episodes=50,
        n_queries=20,
        n_database=500,
        train_per_cluster=5,
        per_query=(2, 4, 2),
    ),
    "default": GlyphsSize(
        n_classes=1000,
        images_per_class=20,
        test_images_per_class=60,
        n_val_episodes=1000,
        n_queries=70,
        n_database=5000,
        train_per_cluster=6,
        per_query=(6, 12, 6),
    ),
}


@dataclass(frozen=True)
class ClassTask:
    """Everything rendered for one character (in one worker, sharing base renderings)."""

    char: str
    split: str
    fonts: tuple[str, ...]
    n_fewshot: int
    n_train_renderings: int = 0
    query_name: str | None = None
    db_names: tuple[str, ...] = ()
    db_designs: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        return gf.class_folder(self.char)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _train_draws(rng: np.random.Generator, fonts: list[str], n: int) -> list[tuple[str, Aug]]:
    """Font and mild augmentation of a training cluster's ``n`` retrieval renderings, in the order
    ``_render_class`` draws them from ``rng`` (``default_rng([seed, code point, 1])``)."""
    return [(str(rng.choice(fonts)), sample_mild_aug(rng)) for _ in range(n)]


def retrieval_training_renderings(
    retrieval_root: Path | str, folders: Iterable[str] | None = None, verify: bool = True
) -> dict[str, dict]:
    """The rendering parameters of the retrieval training images, recomputed from the seed.

    retrieval_root: a ``glyphs-retrieval`` folder (its ``dataset.json`` gives seed and size);
    folders: the training clusters wanted (``U+XXXX``; default all). Returns, per image path
    relative to ``train/`` (``U+0041/U+0041_03.png``), the metadata the test's ground-truth rule
    reads (``retrieval.label_for``): ``char``, ``font``, ``aug`` (``Aug.to_json()``), ``removed``.
    The training renderings are mild and never occluded, so ``removed`` is 0. verify: render
    each image again and require it to equal the file byte for byte (other fonts than the
    build's would give other images: a clear error instead of wrong metadata).
    """
    root = Path(retrieval_root)
    try:
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{root / 'dataset.json'}: unreadable ({exc}); expected a built glyphs-retrieval folder"
        ) from exc
    if info.get("generator_version") != GENERATOR_VERSION or info.get("complete") is not True:
        raise ValueError(
            f"{root / 'dataset.json'}: generator_version {info.get('generator_version')!r}, complete "
            f"{info.get('complete')!r}; expected a complete build of version {GENERATOR_VERSION}"
        )
    seed, n = int(info["seed"]), SIZES[info["size"]].train_per_cluster
    fonts = gf.load_fonts()
    renderer = GlyphRenderer({f.name: f.path for f in fonts})
    wanted = (
        sorted(folders) if folders is not None else sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    )
    out: dict[str, dict] = {}
    for folder in wanted:
        if not folder.startswith("U+"):
            raise ValueError(f"{root / 'train' / folder}: folder name {folder!r}; expected U+XXXX (a code point)")
        ch = chr(int(folder[2:], 16))
        renderer.clear()
        valid = [f for f in sorted(f.name for f in fonts if ch in f.chars) if renderer.base(f, ch) is not None]
        for k, (font, aug) in enumerate(_train_draws(np.random.default_rng([seed, ord(ch), 1]), valid, n)):
            name = f"{folder}/{folder}_{k:02d}.png"
            removed = 0.0
            if verify:
                img, removed = renderer.render(font, ch, aug)
                path = root / "train" / name
                if not path.is_file() or path.read_bytes() != png_bytes(img):
                    raise ValueError(
                        f"{path}: differs from its rendering recomputed from seed {seed} ({font}); the fonts or "
                        "the generator changed since the build: rebuild the glyphs"
                    )
            out[name] = {"char": ch, "font": font, "aug": aug.to_json(), "removed": round(removed, 4)}
    return out


def _render_class(task: ClassTask, renderer: GlyphRenderer, seed: int, fs_root: Path, rt_root: Path) -> dict:
    renderer.clear()
    ch, folder = task.char, task.folder
    valid = [f for f in task.fonts if renderer.base(f, ch) is not None]
    if not valid:
        raise ValueError(f"U+{ord(ch):04X}: none of {len(task.fonts)} font files draws a glyph")
    (fs_root / task.split / folder).mkdir(parents=True)
    if task.n_train_renderings:
        (rt_root / "train" / folder).mkdir(parents=True)
    rng = np.random.default_rng([seed, ord(ch), 0])
    order = [valid[i] for i in rng.permutation(len(valid))]
    fewshot_fonts = []
    for k in range(task.n_fewshot):
        font = order[k % len(order)]
        img, _ = renderer.render(font, ch, sample_fewshot_aug(rng))
        _write(fs_root / task.split / folder / image_name(folder, k, task.n_fewshot), png_bytes(img))
        fewshot_fonts.append(font)
    rng = np.random.default_rng([seed, ord(ch), 1])
    for k, (font, aug) in enumerate(_train_draws(rng, valid, task.n_train_renderings)):
        img, _ = renderer.render(font, ch, aug)
        _write(rt_root / "train" / folder / f"{folder}_{k:02d}.png", png_bytes(img))
    query: dict | None = None
    if task.query_name is not None:
        font, aug = str(rng.choice(valid)), sample_mild_aug(rng)
        img, _ = renderer.render(font, ch, aug)
        _write(rt_root / "test" / "jpg" / f"{task.query_name}.png", png_bytes(img))
        query = {
            "name": task.query_name,
            "char": ch,
            "font": font,
            "aug": aug.to_json(),
            "bbox": list(img.getbbox() or (0, 0, 0, 0)),
        }
    database = []
    for name, design in zip(task.db_names, task.db_designs):
        font, aug = gr.sample_item(design, query["font"] if query else None, valid, gf.family_of, rng)
        img, removed = renderer.render(font, ch, aug)
        _write(rt_root / "test" / "jpg" / f"{name}.png", png_bytes(img))
        database.append(
            {
                "name": name,
                "char": ch,
                "font": font,
                "aug": aug.to_json(),
                "design": design,
                "removed": round(removed, 4),
            }
        )
    return {"folder": folder, "fonts": fewshot_fonts, "n_fonts": len(valid), "query": query, "database": database}


def image_name(folder: str, k: int, n_images: int) -> str:
    """File name of a class's k-th few-shot rendering: two digits, more when the class has over 100."""
    return f"{folder}_{k:0{max(2, len(str(n_images - 1)))}d}.png"


def split_sizes(cfg: GlyphsSize) -> dict[str, int]:
    """Few-shot renderings per class of each split."""
    return {"train": cfg.images_per_class, "val": cfg.images_per_class, "test": cfg.test_images_per_class}


def _render_chunk(args: tuple) -> list[dict]:
    """Worker entry point: (font paths, seed, few-shot root, retrieval root, tasks)."""
    font_paths, seed, fs_root, rt_root, tasks = args
    renderer = GlyphRenderer(font_paths)
    return [_render_class(t, renderer, seed, Path(fs_root), Path(rt_root)) for t in tasks]


def _split_counts(n: int) -> tuple[int, int, int]:
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * SPLIT_FRACTIONS[1])
    return n_train, n_val, n - n_train - n_val


def _plan(pool: list[gf.GlyphClass], cfg: GlyphsSize, seed: int) -> list[ClassTask]:
    """Choose classes, splits, queries and database designs; all from ``default_rng([seed, 0])``."""
    if len(pool) < cfg.n_classes:
        raise ValueError(f"matplotlib fonts give {len(pool)} usable characters, size needs {cfg.n_classes}")
    rng = np.random.default_rng([seed, 0])
    chosen = [pool[i] for i in rng.permutation(len(pool))[: cfg.n_classes]]
    n_train, n_val, _ = _split_counts(cfg.n_classes)
    splits = {"train": chosen[:n_train], "val": chosen[n_train : n_train + n_val], "test": chosen[n_train + n_val :]}
    splits = {k: sorted(v, key=lambda c: ord(c.char)) for k, v in splits.items()}
    test = splits["test"]
    if cfg.n_queries > len(test):
        raise ValueError(f"size asks {cfg.n_queries} retrieval queries, but there are {len(test)} test classes")
    queried = sorted(rng.choice(len(test), cfg.n_queries, replace=False).tolist())
    query_chars = [test[i].char for i in queried]
    distractor_chars = [c.char for c in test if c.char not in set(query_chars)] + [c.char for c in splits["val"]]
    n_pos, n_distractors = gr.design_counts(cfg.n_queries, cfg.n_database, cfg.per_query)
    e, h, j = cfg.per_query
    items = [(ch, d) for ch in query_chars for d in ["easy"] * e + ["hard"] * h + ["junk"] * j]
    counts = gr.spread(n_distractors, len(distractor_chars))
    owners = [distractor_chars[i] for i in rng.permutation(len(distractor_chars))]
    items += [(ch, "distractor") for ch, n in zip(owners, counts) for _ in range(n)]
    names: dict[str, list[tuple[str, str]]] = {}
    for pos, i in enumerate(rng.permutation(len(items))):
        ch, design = items[i]
        names.setdefault(ch, []).append((f"db_{pos:05d}", design))
    query_name = {ch: f"query_{k:03d}" for k, ch in enumerate(query_chars)}
    tasks = []
    for split, classes in splits.items():
        for c in classes:
            mine = names.get(c.char, [])
            tasks.append(
                ClassTask(
                    c.char,
                    split,
                    c.fonts,
                    split_sizes(cfg)[split],
                    cfg.train_per_cluster if split == "train" else 0,
                    query_name.get(c.char),
                    tuple(n for n, _ in mine),
                    tuple(d for _, d in mine),
                )
            )
    return tasks


def _run(
    tasks: list[ClassTask], font_paths: dict[str, str], seed: int, fs_root: Path, rt_root: Path, workers: int
) -> list[dict]:
    chunk = 24
    chunks = [(font_paths, seed, str(fs_root), str(rt_root), tasks[i : i + chunk]) for i in range(0, len(tasks), chunk)]
    n_images = sum(t.n_fewshot + t.n_train_renderings + len(t.db_names) + 1 for t in tasks)
    if workers <= 1 or n_images < _MIN_IMAGES_FOR_WORKERS:
        results = [_render_chunk(c) for c in chunks]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_render_chunk, chunks))
    return [r for rs in results for r in rs]


def _episodes(val_classes: list[str], n_images: int, n_shot: int, n: int, seed: int) -> list[dict]:
    """SIB episodes: 5-way, ``n_shot`` + 15 distinct images per way, paths ``<class>/<image>``."""
    rng = np.random.default_rng([seed, 2, n_shot])
    out = []
    for _ in range(n):
        ways = rng.choice(len(val_classes), N_WAY, replace=False)
        support, query = [], []
        for w in ways:
            folder = val_classes[int(w)]
            picks = rng.permutation(n_images)[: n_shot + N_QUERY]
            paths = [f"{folder}/{image_name(folder, int(k), n_images)}" for k in picks]
            support.append(paths[:n_shot])
            query.append(paths[n_shot:])
        out.append({"Support": support, "Query": query})
    return out


def _write_json(path: Path, obj, compact: bool = False) -> None:
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def _build(fs_root: Path, rt_root: Path, seed: int, size: str, workers: int) -> dict:
    cfg = SIZES[size]
    fonts = gf.load_fonts()
    pool = gf.class_pool(fonts)
    tasks = _plan(pool, cfg, seed)
    font_paths = {f.name: f.path for f in fonts}
    (rt_root / "test" / "jpg").mkdir(parents=True)
    results = _run(tasks, font_paths, seed, fs_root, rt_root, workers)

    classes, n_classes = {}, {"train": 0, "val": 0, "test": 0}
    for task, res in zip(tasks, results):
        classes[task.folder] = {
            "char": task.char,
            "name": unicodedata.name(task.char, ""),
            "split": task.split,
            "n_fonts": res["n_fonts"],
            "fonts": res["fonts"],
        }
        n_classes[task.split] += 1
    _write_json(fs_root / "classes.json", dict(sorted(classes.items())))
    val = sorted(f for f, c in classes.items() if c["split"] == "val")
    for n_shot in (1, 5):
        eps = _episodes(val, cfg.images_per_class, n_shot, cfg.n_val_episodes, seed)
        _write_json(fs_root / f"val_episodes_{n_shot}shot.json", eps, compact=True)
    per_split = split_sizes(cfg)
    n_images = sum(n_classes[s] * per_split[s] for s in n_classes)
    versions = {"generator_version": GENERATOR_VERSION, "seed": seed, "size": size}
    _write_json(
        fs_root / "dataset.json",
        {
            "name": FEWSHOT_DIR,
            **versions,
            "layout": "cifar-fs",
            "image_size": 32,
            "mode": "L",
            "n_classes": n_classes,
            "images_per_class": per_split,
            "n_images": n_images,
            "val_episodes": {"n_way": N_WAY, "n_query": N_QUERY, "n_episodes": cfg.n_val_episodes},
            "fonts": gf.font_versions(fonts),
            "complete": True,
        },
    )

    queries = sorted((r["query"] for r in results if r["query"]), key=lambda q: q["name"])
    database = sorted((d for r in results for d in r["database"]), key=lambda d: d["name"])
    gnd = gr.build_gnd(queries, database, gf.family_of)
    gr.write_gnd_pickle(rt_root / "test" / GND_NAME, [d["name"] for d in database], [q["name"] for q in queries], gnd)
    _write_json(rt_root / "test" / "metadata.json", {"queries": queries, "database": database})
    totals = {k: sum(len(g[k]) for g in gnd) for k in ("easy", "hard", "junk")}
    n_retrieval = {
        "train_clusters": n_classes["train"],
        "train_images": n_classes["train"] * cfg.train_per_cluster,
        "queries": len(queries),
        "database": len(database),
    }
    _write_json(
        rt_root / "dataset.json",
        {
            "name": RETRIEVAL_DIR,
            **versions,
            "layout": "revisitop",
            "image_size": 32,
            "mode": "L",
            **n_retrieval,
            "positives": totals,
            "complete": True,
        },
    )
    return {"n_classes": n_classes, "n_images": n_images, "n_retrieval": n_retrieval}


def _matches(dataset_json: Path, seed: int, size: str) -> dict | None:
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(meta, dict)
        and meta.get("complete") is True
        and meta.get("seed") == seed
        and meta.get("size") == size
        and meta.get("generator_version") == GENERATOR_VERSION
    )
    return meta if ok else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".glyphs.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _swap_in(new: Path, final: Path) -> None:
    """Put ``new`` at ``final``; an old ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_glyphs(root: Path | str, *, seed: int = 0, size: str = "default", workers: int | None = None) -> dict:
    """Render the built-in glyph dataset under ``root`` (or reuse a finished one).

    root: folder that receives ``glyphs/`` and ``glyphs-retrieval/``; seed: every random
    choice; size: ``"small"`` (100 classes, tests and smoke runs) or ``"default"``
    (1,000 classes); workers: processes to render with (default: min(2, CPUs)).

    When both ``dataset.json`` files exist, are complete and match seed, size and
    ``GENERATOR_VERSION``, nothing is written. Otherwise everything is built in a temporary
    folder inside ``root`` and moved into place, so no half-written dataset ever sits under
    the final names. Returns ``{"fewshot_root", "retrieval_root", "n_classes": {split: n},
    "n_images": int (few-shot images), "n_retrieval": {...}, "seed", "size", "cached": bool,
    "seconds": float}``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    start = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fs_final, rt_final = root / FEWSHOT_DIR, root / RETRIEVAL_DIR
    out = {"fewshot_root": str(fs_final), "retrieval_root": str(rt_final), "seed": seed, "size": size}
    with _locked(root):
        fs_meta = _matches(fs_final / "dataset.json", seed, size)
        rt_meta = _matches(rt_final / "dataset.json", seed, size)
        if fs_meta is not None and rt_meta is not None:
            n_retrieval = {k: rt_meta[k] for k in ("train_clusters", "train_images", "queries", "database")}
            return {
                **out,
                "n_classes": fs_meta["n_classes"],
                "n_images": fs_meta["n_images"],
                "n_retrieval": n_retrieval,
                "cached": True,
                "seconds": time.perf_counter() - start,
            }
        tmp = Path(tempfile.mkdtemp(prefix=".glyphs-build-", dir=root))
        try:
            n_workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
            summary = _build(tmp / FEWSHOT_DIR, tmp / RETRIEVAL_DIR, seed, size, n_workers)
            _swap_in(tmp / FEWSHOT_DIR, fs_final)
            _swap_in(tmp / RETRIEVAL_DIR, rt_final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**out, **summary, "cached": False, "seconds": time.perf_counter() - start}
