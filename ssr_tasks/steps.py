"""Pipeline steps as Prefect tasks: thin wrappers over the plain code of this package.

Tasks return file paths (never tensors). Cache keys are the inputs plus the task source,
with results persisted, so a rerun of a deployment reuses prepared data, backbones,
features and finished trials; the plain functions are idempotent as well (they skip
outputs that already exist), which also covers reruns whose Prefect cache was lost.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from ssr_tasks.config import FewShotParams

CACHE = INPUTS + TASK_SOURCE


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def pick_device(pref: str) -> str:
    import torch

    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


class Progress:
    """Progress of a long step, shown twice: a Prefect progress artifact (UI) and a tqdm bar (terminal).

    Call it with ``(done, total)`` or with a fraction ``(f,)``; updates of the artifact are
    throttled to whole percents.
    """

    def __init__(self, key: str, description: str):
        from tqdm.auto import tqdm

        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        import sys

        # a bar only on a terminal: in worker logs it would be a smear of carriage returns
        self.bar = tqdm(total=100, desc=description, unit="%", leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total}%",
                        disable=not sys.stderr.isatty())
        self.last = -1

    def __call__(self, done: float, total: float = 1.0, *_):
        pct = int(100.0 * done / max(total, 1e-12))
        if pct == self.last:
            return
        self.bar.update(pct - max(self.last, 0))
        self.last = pct
        update_progress_artifact(self.id, progress=float(pct))
        if pct >= 100:
            self.bar.close()


@task(name="prepare-data", cache_policy=CACHE, persist_result=True, retries=1)
def prepare_fewshot_data(params: FewShotParams, run_dir: str) -> dict:
    """Built-in glyphs (rendered once per seed/size) or a real dataset root, checked."""
    logger = get_run_logger()
    if params.dataset == "glyphs":
        from storage.glyphs import prepare_glyphs

        info = prepare_glyphs(Path(run_dir) / "data", seed=params.data_seed, size=params.glyphs_size)
        root = Path(info["fewshot_root"])
        val_json = root / f"val_episodes_{params.n_shot_train}shot.json"
    else:
        root = Path(params.data_root).expanduser().resolve()
        val_json = Path(params.val_episodes_json) if params.val_episodes_json else None
    from storage.fewshot import list_split

    for split in ("train", "val", "test"):
        idx = list_split(root, split)
        logger.info("data: %s/%s has %d classes, %d images", root.name, split, len(idx.classes), len(idx.paths))
    return {"root": str(root), "val_json": str(val_json) if val_json and Path(val_json).exists() else None}


@task(name="backbone", cache_policy=CACHE, persist_result=True)
def get_backbone(params: FewShotParams | object, data_root: str, work_dir: str) -> str:
    """A released checkpoint when given (checked against the architecture), else pretrain."""
    from ssr_tasks.backbone_step import load_backbone, pretrain_backbone

    logger = get_run_logger()
    if params.backbone_checkpoint:
        load_backbone(params.backbone, _spec_name(params), Path(params.backbone_checkpoint))
        logger.info("backbone: using released checkpoint %s", params.backbone_checkpoint)
        return str(Path(params.backbone_checkpoint).resolve())
    batch_size, lr = getattr(params, "pretrain_batch_size", 64), getattr(params, "pretrain_lr", 0.1)
    recipe = short_hash([str(Path(data_root).resolve()), params.pretrain_epochs, batch_size, lr, params.seed])
    out = Path(work_dir) / f"{_spec_name(params)}-{params.backbone}-{recipe}.pt"
    logger.info("backbone: pretraining %s on the base classes for %d epochs", params.backbone, params.pretrain_epochs)
    progress = Progress(f"pretrain-{short_hash([work_dir, params.backbone])}", "Backbone pretraining (epochs)")
    return str(pretrain_backbone(Path(data_root), _spec_name(params), params.backbone, out,
                                 epochs=params.pretrain_epochs, batch_size=batch_size, lr=lr, seed=params.seed,
                                 device=pick_device(params.device), progress=progress))


def _spec_name(params) -> str:
    return "glyphs" if params.dataset.startswith("glyphs") else params.dataset


@task(name="extract-features", cache_policy=CACHE, persist_result=True, retries=1)
def extract(params, data_root: str, checkpoint: str, work_dir: str, splits: tuple[str, ...] = ("train", "val", "test")) -> str:
    from ssr_tasks.backbone_step import extract_features

    out = Path(work_dir) / f"features-{short_hash([checkpoint, splits])}.parquet"
    get_run_logger().info("features: extracting %s into %s", ", ".join(splits), out.name)
    return str(extract_features(Path(data_root), _spec_name(params), params.backbone, Path(checkpoint), out,
                                splits=splits, device=pick_device(params.device)))


@task(name="validation-episodes", cache_policy=CACHE, persist_result=True)
def validation_episodes(params: FewShotParams, features: str, val_json: str | None, work_dir: str) -> str:
    """Fixed validation episodes as index arrays (.npz): the SIB JSON when present, else seeded."""
    from ssr_tasks.episodes import episodes_from_json, load_split, sample_episodes

    val = load_split(Path(features), "val")
    if val_json:
        eps = episodes_from_json(val, Path(val_json), limit=params.n_val_episodes)
    else:
        eps = sample_episodes(val, params.n_val_episodes, params.n_way, params.n_shot_train, params.n_query, seed=10_000 + params.seed)
    out = Path(work_dir) / f"val-episodes-{short_hash([features, val_json, params.n_val_episodes])}.npz"
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, support=eps.support, query=eps.query)
    tmp.replace(out)
    get_run_logger().info("validation: %d fixed %d-way %d-shot episodes", len(eps), params.n_way, eps.support.shape[2])
    return str(out)


def train_config(params: FewShotParams, feat_dim: int):
    from ssr_tasks.fewshot_train import TrainConfig

    return TrainConfig(
        feat_dim=feat_dim, n_way=params.n_way, n_shot=params.n_shot_train, n_query=params.n_query,
        hidden=params.hidden, lr_dni=params.lr_dni_grid[0], max_steps=params.max_steps,
        iterations_first=params.iterations_first, iterations_next=params.iterations_next,
        lr_first=params.lr_first, lr_next=params.lr_next, batch_episodes=params.batch_episodes,
        val_every=params.val_every, seed=params.seed,
    )


@task(name="train-ssr", retries=1, retry_delay_seconds=5)
def train_ssr(params: FewShotParams, features: str, val_npz: str, work_dir: str, feat_dim: int) -> list[dict]:
    """Ray Tune grid over lr_dni; each trial runs the steps curriculum and checkpoints."""
    from ssr_tasks.ray_fewshot import run_grid

    base = train_config(params, feat_dim)
    root = Path(work_dir) / f"ssr-{short_hash({k: v for k, v in asdict(base).items() if k != 'lr_dni'})}"
    get_run_logger().info("SSR: training %d trial(s) lr_dni=%s, steps 1..%d, checkpoints in %s",
                          len(params.lr_dni_grid), params.lr_dni_grid, params.max_steps, root)
    progress = Progress(f"train-{short_hash([features, str(root)])}", "SSR training (all trials)")
    return run_grid(base, list(params.lr_dni_grid), Path(features), Path(val_npz), root / "trials", Path(work_dir) / "ray_results",
                    progress=progress)


@task(name="choose-k-reciprocal", cache_policy=CACHE, persist_result=True)
def choose_krecip(params: FewShotParams, features: str, val_npz: str) -> list:
    """The k-reciprocal grid evaluated on validation episodes only; returns the best (k1, k2, lambda)."""
    from ssr_tasks.episodes import EpisodeIndices
    from ssr_tasks.ray_fewshot import evaluate_with_pool

    eps = np.load(val_npz)
    grid = [(k1, k2, lam) for k1 in params.krecip_k1 for k2 in params.krecip_k2 for lam in params.krecip_lambda]
    res = evaluate_with_pool(Path(features), "val", EpisodeIndices(eps["support"], eps["query"]), None, None,
                             krecip=grid, with_ssr=False, n_actors=params.n_eval_actors)
    scores = {g: float(res[f"krecip:{g[0]}:{g[1]}:{g[2]}"].mean()) for g in grid}
    best = max(scores, key=scores.get)
    get_run_logger().info("k-reciprocal: best on validation k1=%d k2=%d lambda=%.1f (%.2f%%)", *best, 100 * scores[best])
    return list(best)


@task(name="evaluate-fewshot", retries=1)
def evaluate_fewshot(params: FewShotParams, features: str, model_path: str, model_kwargs: dict, krecip: list, shot: int) -> dict:
    """Test episodes of the novel classes scored by Ray actors; per-episode accuracies."""
    from ssr_tasks.episodes import load_split, sample_episodes
    from ssr_tasks.ray_fewshot import evaluate_with_pool

    test = load_split(Path(features), "test")
    eps = sample_episodes(test, params.n_test_episodes, params.n_way, shot, params.n_query, seed=20_000 + params.seed + shot)
    progress = Progress(f"eval-{shot}shot-{short_hash([features, model_path])}", f"Evaluation, {shot}-shot episodes")
    get_run_logger().info("evaluation: %d test episodes, %d-way %d-shot", len(eps), params.n_way, shot)
    res = evaluate_with_pool(Path(features), "test", eps, model_path, model_kwargs, krecip=[tuple(krecip)],
                             n_actors=params.n_eval_actors, progress=progress)
    res["krecip"] = res.pop(f"krecip:{krecip[0]}:{krecip[1]}:{krecip[2]}")
    return {k: v.tolist() for k, v in res.items()}


# ---- retrieval ---------------------------------------------------------------------------


@task(name="prepare-retrieval-data", cache_policy=CACHE, persist_result=True, retries=1)
def prepare_retrieval_data(params, run_dir: str) -> dict:
    """The built-in glyph retrieval set: training clusters, test queries/database and ground truth."""
    from storage.glyphs import prepare_glyphs
    from storage.landmarks import read_revisited_gnd

    info = prepare_glyphs(Path(run_dir) / "data", seed=params.data_seed, size=params.glyphs_size)
    root = Path(info["retrieval_root"])
    gnd_path = root / "test" / "gnd_glyphs-retrieval.pkl"
    gt = read_revisited_gnd(gnd_path)
    get_run_logger().info("data: %d queries, %d database images, training clusters in %s",
                          len(gt.qimlist), len(gt.imlist), root / "train")
    return {"root": str(root), "gnd": str(gnd_path), "fewshot_root": info["fewshot_root"]}


@task(name="extract-retrieval-features", cache_policy=CACHE, persist_result=True, retries=1)
def extract_retrieval(params, data: dict, checkpoint: str, work_dir: str) -> str:
    """One features table: split 'database' (ids 0..N-1 in imlist order), 'query' (ids N..), 'train' (cluster labels)."""
    from storage.features import write_features
    from storage.fewshot import DATASET_SPECS, list_split
    from storage.landmarks import read_revisited_gnd
    from storage.checkpoints import file_sha256
    from ssr_tasks.backbone_step import extract_split_features, load_backbone

    out = Path(work_dir) / f"retrieval-features-{short_hash([checkpoint, data])}.parquet"
    if out.exists():
        return str(out)
    spec = DATASET_SPECS["glyphs"]
    device = pick_device(params.device)
    net = load_backbone(params.backbone, "glyphs", Path(checkpoint), device)
    gt = read_revisited_gnd(Path(data["gnd"]))
    jpg = Path(data["root"]) / "test" / "jpg"
    from storage.fewshot import SplitIndex

    def names_index(names):
        return SplitIndex(root=jpg, paths=[f"{n}.png" for n in names], labels=np.zeros(len(names), np.int64), classes=["-"])

    db = extract_split_features(net, names_index(gt.imlist), spec, device)
    qs = extract_split_features(net, names_index(gt.qimlist), spec, device)
    train_idx = list_split(Path(data["root"]), "train")
    tr = extract_split_features(net, train_idx, spec, device)
    emb = np.concatenate([db, qs, tr])
    labels = ["db"] * len(db) + ["query"] * len(qs) + [train_idx.classes[c] for c in train_idx.labels]
    splits = ["database"] * len(db) + ["query"] * len(qs) + ["train"] * len(tr)
    paths = [f"test/jpg/{n}.png" for n in gt.imlist] + [f"test/jpg/{n}.png" for n in gt.qimlist] + [f"train/{p}" for p in train_idx.paths]
    meta = {"dataset": params.dataset, "backbone": params.backbone, "checkpoint_hash": file_sha256(Path(checkpoint)), "dim": str(emb.shape[1])}
    write_features(out, ids=np.arange(len(emb), dtype=np.int64), labels=labels, splits=splits, embeddings=emb, paths=paths, metadata=meta)
    get_run_logger().info("features: %d database, %d queries, %d training images", len(db), len(qs), len(tr))
    return str(out)


def retrieval_train_config(params, feat_dim: int):
    from ssr_tasks.retrieval_train import RetrievalTrainConfig

    return RetrievalTrainConfig(feat_dim=feat_dim, k=params.k, steps=params.steps, hidden=params.hidden,
                                lr_dni=params.lr_dni_grid[0], sequence_length=params.sequence_length, min_positives=params.min_positives,
                                iterations=params.iterations, batch_queries=params.batch_queries, lr=params.lr,
                                val_every=params.val_every, seed=params.seed)


@task(name="train-retrieval-ssr", retries=1, retry_delay_seconds=5)
def train_retrieval_ssr(params, features: str, work_dir: str, feat_dim: int) -> list[dict]:
    from ssr_tasks.ray_retrieval import run_grid

    base = retrieval_train_config(params, feat_dim)
    root = Path(work_dir) / f"ssr-{short_hash({k: v for k, v in asdict(base).items() if k != 'lr_dni'})}"
    get_run_logger().info("SSR: %d retrieval trial(s) lr_dni=%s, k=%d, steps=%d", len(params.lr_dni_grid), params.lr_dni_grid, params.k, params.steps)
    progress = Progress(f"train-{short_hash([features, str(root)])}", "Retrieval SSR training (all trials)")
    return run_grid(base, list(params.lr_dni_grid), Path(features), root / "trials", Path(work_dir) / "ray_results", progress=progress)


@task(name="rerank-store", retries=1)
def rerank(store_dir: str, query_features: str, db_features: str, out_dir: str, model_path: str, model_kwargs: dict, n_actors: int) -> str:
    from ssr_tasks.rerank import rerank_store

    progress = Progress(f"rerank-{short_hash([store_dir, model_path])}", f"Re-ranking shards of {Path(store_dir).name}")
    return str(rerank_store(Path(store_dir), Path(query_features), Path(db_features), Path(out_dir), model_path,
                            model_kwargs, n_actors=n_actors, progress=progress))
