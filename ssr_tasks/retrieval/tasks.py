"""The retrieval steps as Prefect tasks: thin wrappers over the plain code of this package.

Each returns a typed hand-off (``ssr_tasks.retrieval.handoffs``) of file paths and scalars.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from ssr_tasks.backbone import dataset_spec, extract_split_features, load_backbone
from ssr_tasks.config import (
    Device,
    RetrievalBaselineParams,
    RetrievalDataParams,
    RetrievalEvalParams,
    RetrievalParams,
    RetrievalTrainParams,
    Sweep,
    sweep_points,
)
from ssr_tasks.device import cluster_device, local_device
from ssr_tasks.handoffs import Backbone, Trials, TrialTracking, required
from ssr_tasks.retrieval.costs import measure_ssr
from ssr_tasks.retrieval.distractors import feature_distractors, glyph_distractors
from ssr_tasks.retrieval.handoffs import (
    MethodStore,
    Rankings,
    Reranked,
    RetrievalCost,
    RetrievalData,
    RetrievalFeatures,
    RetrievalModel,
    RetrievalTrials,
)
from ssr_tasks.retrieval.ranker import DATABASE_NPY, RANKS_DIR, rank_in_actor, write_database_npy
from ssr_tasks.retrieval.ray_jobs import run_trials
from ssr_tasks.retrieval.rerank import rerank_store
from ssr_tasks.retrieval.settings import holdout_fraction_for_k, relaxed_sequence_filter, scaled_lr_dni
from ssr_tasks.retrieval.train import load_training_data, validation_of
from ssr_tasks.retrieval.validation import (
    choose_on_validation,
    grid_scale,
    mirror_validation,
    qe_scale_for,
    test_set_profile,
    val_vs_test_rows,
    write_val_vs_test,
)
from ssr_tasks.taskkit import CACHE, Progress, retry_transient, short_hash
from storage.checkpoints import file_sha256
from storage.features import read_features, read_metadata, write_features
from storage.fewshot import SplitIndex, list_split
from storage.glyphs import GND_NAME, prepare_glyphs
from storage.landmark_tables import holdout_clusters, import_test_set, import_train_set, validation_ground_truth
from storage.landmarks import read_gnd
from storage.own_data import import_retrieval_folder

log = logging.getLogger(__name__)


@task(
    name="prepare-retrieval-data",
    cache_policy=CACHE,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def prepare_data(params: RetrievalDataParams, run_dir: str) -> RetrievalData:
    """The test set and its training data: the built-in glyphs (images, ground truth, training
    clusters), or rOxford5k / rParis6k with SfM-120k from the authors' pickles (features
    tables imported once into ``<run_dir>/data/landmarks``)."""
    if params.entry.loader != "glyphs":
        return import_landmark_data(params, run_dir)
    info = prepare_glyphs(Path(run_dir) / "data", seed=params.data_seed, size=params.glyphs_size)
    root = Path(info["retrieval_root"])
    data = RetrievalData(str(root), str(root / "test" / GND_NAME), str(root / "test" / "jpg"), info["fewshot_root"])
    gt = read_gnd(Path(data.gnd))
    get_run_logger().info(
        "data: %d queries, %d database images, training clusters in %s", len(gt.qimlist), len(gt.imlist), root / "train"
    )
    return data


def data_for_run(params: RetrievalParams) -> RetrievalDataParams:
    """The data group a run uses: with ``from_data`` and a user's embeddings folder, the held-out
    fraction sized for k from the training clusters' sizes (``settings.holdout_fraction_for_k``;
    only the label column of train.parquet is read)."""
    data = params.data
    if not (params.from_data and data.entry.loader == "features"):
        return data
    table = Path(required(data.data_root, "data.data_root")) / "train.parquet"
    try:
        labels = pq.read_table(table, columns=["label"]).column("label").to_numpy(zero_copy_only=False)
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise ValueError(f"{table}: label: cannot read the training clusters ({exc})") from None
    _, sizes = np.unique(labels, return_counts=True)
    fraction = holdout_fraction_for_k(sizes, params.k_max, params.train.n_val_queries)
    log.info(
        "settings from the data: holdout_fraction %.3g (%d training clusters, k=%d, %d validation queries)",
        fraction,
        len(sizes),
        params.k_max,
        params.train.n_val_queries,
    )
    return data.model_copy(update={"holdout_fraction": fraction})


@task(name="settings-from-data", cache_policy=CACHE, persist_result=True)
def settings_from_data(
    train: RetrievalTrainParams, sweep: Sweep, features: RetrievalFeatures
) -> tuple[RetrievalTrainParams, Sweep]:
    """``from_data``: the lr_dni sweep around lr* measured on the training features, and the
    sequence filter relaxed until a quarter of the draws pass (``ssr_tasks.retrieval.settings``)."""
    emb, labels, _ = load_training_data(Path(features.train_path), train)
    lr_grid = scaled_lr_dni(emb, k=train.k, hidden=train.hidden, seed=train.seed)
    length, min_positives, stats = relaxed_sequence_filter(
        emb, labels, train.k, train.sequence_length, train.min_positives, train.max_ap, seed=train.seed
    )
    get_run_logger().info(
        "settings from the data: lr_dni %s (one spread of the top-k cosines per first update), "
        "sequence_length %d, min_positives %d (%.0f%% of draws pass, %.1f positives in the top-%d)",
        lr_grid,
        length,
        min_positives,
        100 * stats["pass_rate"],
        stats["positives_in_topk"],
        train.k,
    )
    return (
        train.model_copy(update={"sequence_length": length, "min_positives": min_positives}),
        {**sweep, "lr_dni": lr_grid},
    )


def check_holdout(data: RetrievalData, train: RetrievalTrainParams, k: int) -> None:
    """Refuse, before anything trains, a held-out validation set too small for ``k``: its
    database (held-out items that are not validation queries) must hold at least k items."""
    held = read_features(Path(required(data.train, "the training table")), split="val")
    _, database, _ = validation_ground_truth(np.asarray(held.labels), train.n_val_queries, train.seed)
    if len(database) < k:
        raise ValueError(
            f"{data.train}: split 'val' (held-out clusters) leaves {len(database)} database items after "
            f"{train.n_val_queries} validation queries, fewer than k={k}; raise data.holdout_fraction or "
            f"lower train.k or train.n_val_queries"
        )


def import_landmark_data(params: RetrievalDataParams, run_dir: str | Path) -> RetrievalData:
    """Embeddings given, imported once into ``<run_dir>/data/``: rOxford5k / rParis6k and
    SfM-120k from the authors' pickles under ``params.data_root`` (``data/landmarks``), or a
    user's labelled embeddings folder (``dataset: features``, ``data/features``: train,
    queries, database tables, ground truth from gnd.pkl / gnd.json or label matches). Plain
    code: ``ssr run`` calls it before the flow starts, so bad input is reported in one line.
    Bad files raise StorageError."""
    if params.entry.loader == "features":
        imported = import_retrieval_folder(
            required(params.data_root, "data.data_root"),
            Path(run_dir) / "data" / "features",
            holdout_fraction=params.holdout_fraction,
            holdout_seed=params.holdout_seed,
        )
        test, train = imported.test, imported.train
    else:
        cache = Path(run_dir) / "data" / "landmarks"
        test = import_test_set(required(params.data_root, "data.data_root"), params.dataset, cache)
        train = import_train_set(
            required(params.data_root, "data.data_root"),
            cache,
            holdout_fraction=params.holdout_fraction,
            holdout_seed=params.holdout_seed,
            expected_dim=test.dim,
        )
    gt = read_gnd(test.gnd)
    log.info(
        "data: %s, %d queries, %d database images, D=%d; training: %d items and %d held-out "
        "(%g of the clusters, seed %d)",
        params.dataset,
        len(gt.qimlist),
        len(gt.imlist),
        test.dim,
        train.n_train,
        train.n_val,
        params.holdout_fraction,
        params.holdout_seed,
    )
    root = Path(required(params.data_root, "data.data_root")).resolve()
    # a user's tables whose rows carry image paths (relative to data_root, or absolute) get the example figure
    carries_paths = params.entry.loader == "features" and "path" in pq.read_schema(test.database).names
    return RetrievalData(
        str(root),
        str(test.gnd),
        images=str(root) if carries_paths else None,
        database=str(test.database),
        queries=str(test.query),
        train=str(train.table),
    )


@task(
    name="extract-retrieval-features",
    cache_policy=CACHE,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def extract_features(
    params: RetrievalDataParams,
    k: int,
    data: RetrievalData,
    backbone: Backbone | None,
    work_dir: str,
    device: Device = "auto",
) -> RetrievalFeatures:
    """The test table: split 'database' (ids 0..N-1 in imlist order), 'query' (ids N..); and
    the training table, split 'train' / 'val' (held-out clusters). Glyphs: both in one table
    embedded by ``backbone``; published features: the test table joined from the imported
    ones, the training table as imported.

    The glyph images are rendered into the same folder whatever their seed and size, so the
    table's name carries ``data_seed`` and ``glyphs_size``: the paths in ``data`` alone would
    hand back another rendering's features. ``gnd``: the test ground truth, whose profile
    the validation mirrors (``ssr_tasks.retrieval.validation``)."""
    return replace(_features(params, k, data, backbone, work_dir, device), gnd=data.gnd)


def _features(
    params: RetrievalDataParams,
    k: int,
    data: RetrievalData,
    backbone: Backbone | None,
    work_dir: str,
    device: Device,
) -> RetrievalFeatures:
    gt = read_gnd(Path(data.gnd))
    if k > len(gt.imlist):
        raise ValueError(f"k: {k} is larger than the database ({len(gt.imlist)} images)")
    if not data.needs_backbone:
        joined = _join_test_tables(data, Path(work_dir), len(gt.imlist), len(gt.qimlist))
        if not params.distractors_path:
            return joined
        table, n = feature_distractors(Path(joined.path), params.distractors_path)  # appended, streamed
        return RetrievalFeatures(str(table), joined.dim, joined.n_database + n, joined.n_queries, joined.train_path)
    backbone = required(backbone, "the backbone of the glyph images")
    holdout = [params.holdout_fraction, params.holdout_seed]
    glyphs = [params.data_seed, params.glyphs_size]
    out = Path(work_dir) / f"retrieval-features-{short_hash([backbone.path, asdict(data), holdout, glyphs])}.parquet"
    if not out.exists():
        _extract(params, data, backbone, gt, out, device)
    dim = int(read_metadata(out)["dim"])
    if params.distractors:  # the test table with the distractors appended; training reads the table without them
        test = glyph_distractors(params, data, backbone, out, Path(work_dir), device)
        return RetrievalFeatures(str(test), dim, len(gt.imlist) + params.distractors, len(gt.qimlist), str(out))
    return RetrievalFeatures(str(out), dim, len(gt.imlist), len(gt.qimlist), str(out))


def _join_test_tables(data: RetrievalData, work_dir: Path, n_db: int, n_queries: int) -> RetrievalFeatures:
    out = work_dir / f"retrieval-features-{short_hash([data.database, data.queries])}.parquet"
    if not out.exists():
        db = read_features(Path(required(data.database, "the database table")))
        qs = read_features(Path(required(data.queries, "the queries table")), expected_dim=db.dim)
        N, Q = len(db), len(qs)
        paths = db.paths + qs.paths if db.paths is not None and qs.paths is not None else None
        write_features(
            out,
            ids=np.arange(N + Q),
            labels=["db"] * N + ["query"] * Q,
            splits=["database"] * N + ["query"] * Q,
            embeddings=np.concatenate([db.embeddings, qs.embeddings]),
            paths=paths,
            metadata=db.metadata,
        )
    return RetrievalFeatures(str(out), int(read_metadata(out)["dim"]), n_db, n_queries, str(data.train))


def _extract(
    params: RetrievalDataParams, data: RetrievalData, backbone: Backbone, gt, out: Path, device: Device
) -> None:
    spec = dataset_spec(backbone.spec)
    dev = local_device(device)
    net = load_backbone(backbone.name, backbone.spec, Path(backbone.path), dev)
    images = Path(required(data.images, "the glyph images"))

    def names_index(names: list[str]) -> SplitIndex:
        return SplitIndex(
            root=images, paths=[f"{n}.png" for n in names], labels=np.zeros(len(names), np.int64), classes=["-"]
        )

    db = extract_split_features(net, names_index(gt.imlist), spec, dev)
    qs = extract_split_features(net, names_index(gt.qimlist), spec, dev)
    train_idx = list_split(Path(data.root), "train")
    tr = extract_split_features(net, train_idx, spec, dev)
    emb = np.concatenate([db, qs, tr])
    clusters = [train_idx.classes[c] for c in train_idx.labels]
    held = holdout_clusters(np.asarray(clusters), params.holdout_fraction, params.holdout_seed)
    labels = ["db"] * len(db) + ["query"] * len(qs) + clusters
    splits = ["database"] * len(db) + ["query"] * len(qs) + np.where(held, "val", "train").tolist()
    rel = images.relative_to(data.root).as_posix()
    paths = (
        [f"{rel}/{n}.png" for n in gt.imlist]
        + [f"{rel}/{n}.png" for n in gt.qimlist]
        + [f"train/{p}" for p in train_idx.paths]
    )
    meta = {
        "dataset": params.dataset,
        "backbone": backbone.name,
        "checkpoint_hash": file_sha256(Path(backbone.path)),
        "dim": str(emb.shape[1]),
    }
    write_features(
        out,
        ids=np.arange(len(emb), dtype=np.int64),
        labels=labels,
        splits=splits,
        embeddings=emb,
        paths=paths,
        metadata=meta,
    )
    get_run_logger().info(
        "features: %d database, %d queries, %d training images (%d held out for validation)",
        len(db),
        len(qs),
        len(tr),
        int(held.sum()),
    )


@task(name="train-retrieval-ssr", retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def train_ssr(
    train: RetrievalTrainParams,
    sweep: Sweep,
    features: RetrievalFeatures,
    work_dir: str,
    tracking: TrialTracking | None = None,
    device: Device = "auto",
) -> RetrievalTrials:
    """Ray Tune grid over the points of ``sweep`` of SSR trained on retrieval sequences from the
    training clusters; the trial and its checkpoint with the best validation mAP (held-out
    clusters) win. tracking: each trial logs to its nested MLflow run while it trains.
    Under ``val_protocol: mirror-test`` the validation database is sized from the test set first."""
    train = mirror_validation(train, features)
    root = Path(work_dir) / f"ssr-{short_hash([train.model_dump(), features.train_path])}"
    logger = get_run_logger()
    points = sweep_points(sweep)
    logger.info(
        "SSR: %d retrieval trial(s) over %s, k=%d, steps=%d",
        len(points),
        dict(sweep) or "no sweep",
        train.k,
        train.steps,
    )
    progress = Progress(f"train-{short_hash([features.path, str(root)])}", "Retrieval SSR training (all trials)")
    trials = Trials(
        tuple(
            run_trials(
                train,
                sweep,
                Path(features.train_path),
                features.dim,
                root / "trials",
                Path(work_dir) / "ray_results",
                device=cluster_device(device),
                progress=progress,
                tracking=tracking,
            )
        )
    )
    for t in trials.trials:
        logger.info(
            "SSR: trial %s, best validation mAP %.2f%% at iteration %d", t.label, 100 * t.best_val, t.best_iteration
        )
    logger.info(
        "SSR: chosen on validation: %s, checkpoint of iteration %d (validation mAP %.2f%%)",
        trials.best.label,
        trials.best.best_iteration,
        100 * trials.best.best_val,
    )
    return trials


@task(name="rank-methods", cache_policy=CACHE, persist_result=True)
def rank_methods(
    baselines: RetrievalBaselineParams,
    train: RetrievalTrainParams,
    k: int,
    shard_size: int,
    features: RetrievalFeatures,
    work_dir: str,
    n_search_actors: int = -1,
) -> Rankings:
    """QE's n and the k-reciprocal point chosen on validation (held-out clusters), then the
    initial rankings of every method (``baselines.methods``), each as a top-K store with its
    query table and its (Q, N) ranks, plus the database as an L2-normalised ``database.npy``
    (row = id; streamed from the features table once) that the ranking actor, the re-ranking
    actors and the cost probe memory-map (``ranker``: the rows are computed one at a time in a
    Ray actor and dropped once written, so memory does not grow with the number of rows nor
    hold the database). The stores' folder is named after the features, the choice, the
    stores' K and shard size.
    k: the largest k of any trial; train: its n_val_queries and seed draw the validation queries.

    Under ``val_protocol: mirror-test`` the validation mirrors the test set and the grids'
    neighbour counts are scaled to its database (``ssr_tasks.retrieval.validation``). With
    ``baselines.val_vs_test`` every grid point is also scored on the test queries, for the
    val_vs_test table only (by the same actor, on the same memory map). Each row's cost is
    that of the pipeline's own call, measured in the actor (``ranker``).
    n_search_actors: the re-rankers' candidate searches on the test database run as blocks on
    a Ray actor pool (``ray_jobs.candidate_search``; -1: only on a multi-node cluster)."""
    logger = get_run_logger()
    train = mirror_validation(train, features)
    val = validation_of(train, Path(features.train_path), features.dim)
    scale = grid_scale(train, len(val.database), features.n_database)
    # opted in (baselines.val_scale_qe): QE's n scaled by the measured positives-per-query ratio
    qe_scale = qe_scale_for(train, val, test_set_profile(features)) if baselines.val_scale_qe else None
    choice, val_label = choose_on_validation(val, baselines, scale, qe_scale=qe_scale)
    logger.info(
        "baselines chosen on validation (%d held-out queries, %d database items, neighbour counts x %.3g): %s",
        len(val.queries),
        len(val.database),
        scale,
        ", ".join(f"{k.removeprefix('chosen.')} {v}" for k, v in choice.as_params().items()),
    )
    k_store = min(features.n_database, max(k, 100))
    # K and the shard size shape every top-K store (an existing store of another shape is refused)
    stores = Path(work_dir) / "stores" / short_hash([features.path, choice.as_params(), k_store, shard_size])
    stores.mkdir(parents=True, exist_ok=True)
    database = write_database_npy(features.path, stores / DATABASE_NPY, features.n_database, features.dim)
    ranked, test_map = rank_in_actor(
        features,
        str(database),
        choice,
        str(stores),
        k_store,
        shard_size,
        n_search_actors,
        baselines if baselines.val_vs_test and features.gnd is not None else None,
    )
    for r in ranked:
        c = r.cost
        logger.info(
            "cost %s: %.3g ms/query, peak %.3g MiB, %.3g CPU s", c.name, c.ms_per_query, c.peak_mib, c.cpu_seconds
        )
    table = None
    if test_map is not None:
        note = (
            f"Validation: {len(val.queries)} held-out queries against {len(val.database)} items "
            f"({train.val_protocol}); test: {features.n_queries} queries against {features.n_database} items; "
            f"validation neighbour counts = test's x {scale:.3g}."
        )
        table = write_val_vs_test(val_vs_test_rows(choice, val_label, test_map), stores / "val_vs_test.csv", note)
    return Rankings(
        str(stores / RANKS_DIR),
        str(database),
        tuple(r.store for r in ranked),
        choice,
        str(table) if table else None,
        tuple(r.cost for r in ranked),
        str(features.path),
    )


@task(name="rerank-store", retries=1, retry_condition_fn=retry_transient)
def rerank(
    evaluation: RetrievalEvalParams,
    rankings: Rankings,
    method: MethodStore,
    model: RetrievalModel,
    device: Device = "auto",
) -> Reranked:
    """Every shard of a method's top-K store re-ranked by SSR on a pool of Ray actors; the first
    method's task also measures SSR's cost on every method's store (``costs.measure_ssr``)."""
    out = Path(method.topk).parent / f"reranked-{short_hash([model.weights])}"
    progress = Progress(f"rerank-{short_hash([method.topk, model.weights])}", f"Re-ranking shards of {method.name}")
    rerank_store(
        Path(method.topk),
        Path(method.queries),
        Path(rankings.database),
        out,
        model,
        n_actors=evaluation.n_rerank_actors,
        device=cluster_device(device),
        progress=progress,
    )
    costs: tuple[RetrievalCost, ...] = ()
    if rankings.features is not None and method == rankings.methods[0]:
        # SSR's call on every method's top-k, measured once per run in one actor (not once per method)
        costs = measure_ssr(
            [(m.name, m.topk, m.queries) for m in rankings.methods],
            model,
            rankings.database,
            cluster_device(device),
        )
    return Reranked(method.name, str(out), costs)
