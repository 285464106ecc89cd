"""The few-shot steps as Prefect tasks: thin wrappers over the plain code of this package.

Each returns a typed hand-off (``ssr_tasks.fewshot.handoffs``) of file paths and scalars.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from ssr_model.baselines import PEER_METHODS
from ssr_model.baselines.peers import COMPOSED_METHODS
from ssr_tasks.backbone import encode_spec, load_backbone, spec_name
from ssr_tasks.backbone import extract_features as extract_features_to
from ssr_tasks.config import (
    Device,
    EpisodeShape,
    FewShotBackboneParams,
    FewShotBaselineParams,
    FewShotDataParams,
    FewShotEvalParams,
    FewShotTrainParams,
    Sweep,
    query_balance_alpha,
    sweep_points,
)
from ssr_tasks.device import cluster_device, local_device
from ssr_tasks.fewshot.episodes import (
    EpisodeIndices,
    fixed_episodes,
    load_split,
    repeated_query_fraction,
    sample_balanced_or_dirichlet,
    sample_dirichlet_episodes,
    sample_episodes,
)
from ssr_tasks.fewshot.evaluate import krecip_key, variant_key
from ssr_tasks.fewshot.handoffs import (
    FewShotData,
    FewShotModel,
    FewShotTrial,
    FewShotTrials,
    KReciprocal,
    MethodCostRow,
    ReleasedModel,
    ShotResult,
    TrainingFeatures,
    ValidationEpisodes,
    peer_key,
    ssr_key,
)
from ssr_tasks.fewshot.ray_jobs import FewShotTrialInputs, evaluate_with_pool, run_trials
from ssr_tasks.fewshot.released import unpack_released
from ssr_tasks.fewshot.train_features import TrainAugment, extract_views
from ssr_tasks.handoffs import Backbone, Features, Trials, TrialTracking, required
from ssr_tasks.taskkit import CACHE, Progress, retry_transient, short_hash
from storage.checkpoints import file_sha256
from storage.features import read_metadata
from storage.fewshot import data_identity, find_val_episodes
from storage.glyphs import prepare_glyphs
from storage.image_folder import image_folder_spec, list_image_folder
from storage.own_data import check_usable, import_fewshot_table, usable_classes


@task(name="prepare-data", cache_policy=CACHE, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def prepare_data(data: FewShotDataParams, episode: EpisodeShape, run_dir: str) -> FewShotData:
    """Built-in glyphs (rendered once per seed/size), an image folder (checked), or an
    embeddings table (checked when it is imported, ``import_features``)."""
    logger = get_run_logger()
    if data.entry.loader == "features":
        root = Path(required(data.data_root, "data.data_root")).expanduser().resolve()
        val_json = Path(data.val_episodes_json) if data.val_episodes_json else None
        return FewShotData(str(root), str(val_json) if val_json else None)
    if data.entry.loader == "glyphs":
        info = prepare_glyphs(Path(run_dir) / "data", seed=data.data_seed, size=data.glyphs_size)
        root = Path(info["fewshot_root"])
        val_json = root / f"val_episodes_{episode.n_shot}shot.json"
    else:
        root = Path(required(data.data_root, "data.data_root")).expanduser().resolve()
        val_json = Path(data.val_episodes_json) if data.val_episodes_json else None
        if val_json is None:
            val_json = find_val_episodes(root, episode.n_way, episode.n_shot, episode.n_query)
            if val_json is not None:
                logger.info(
                    "validation: %s holds the authors' fixed episodes; validating on %s (set "
                    "val_episodes_json to use others)",
                    root.name,
                    val_json.name,
                )
    for split, idx in list_image_folder(root).items():
        logger.info("data: %s/%s has %d classes, %d images", root.name, split, len(idx.classes), len(idx.paths))
    return FewShotData(str(root), str(val_json) if val_json and val_json.exists() else None)


@task(name="image-spec", cache_policy=CACHE, persist_result=True)
def image_spec(data_params: FewShotDataParams, data: FewShotData, work_dir: str) -> str:
    """How images become network input: a paper dataset's fixed spec, or for an image folder
    ``image_size`` and ``normalization`` (``auto``: mean and std of the train split, computed
    once and cached under ``work_dir``), as a spec string (``ssr_tasks.backbone.dataset_spec``)."""
    entry = data_params.entry
    if entry.spec is not None:
        return entry.spec
    spec = image_folder_spec(
        data.root, data_params.image_size, data_params.normalization, cache_dir=Path(work_dir) / "image-stats"
    )
    get_run_logger().info(
        "images: resized to %dx%d, normalised with mean %s and std %s (%s)",
        spec.image_size,
        spec.image_size,
        [round(m, 4) for m in spec.mean],
        [round(s, 4) for s in spec.std],
        data_params.normalization,
    )
    return encode_spec(spec)


@task(name="import-features", cache_policy=CACHE, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def import_features(data_params: FewShotDataParams, run_dir: str) -> Features:
    """A user's embeddings table (``dataset: features``) imported once as a features table
    under ``<run_dir>/data/features``: no backbone; its train split trains SSR, val
    chooses, test scores."""
    imported = import_fewshot_table(
        required(data_params.data_root, "data.data_root"), Path(run_dir) / "data" / "features"
    )
    get_run_logger().info(
        "features: %s, D=%d, %s",
        imported.path.name,
        imported.dim,
        ", ".join(f"{n} {s}" for s, n in imported.counts.items()),
    )
    return Features(str(imported.path), imported.dim)


@task(name="check-classes", cache_policy=CACHE, persist_result=True)
def check_classes(features: Features, episode: EpisodeShape, eval_shots: list[int]) -> tuple[tuple[str, int], ...]:
    """Classes too small to fill an episode are left out of their split's episodes: one
    warning per split names them and their counts; a split with fewer than n_way usable
    classes is refused. Returns (split, classes left out) for the MLflow run."""
    need = {
        "train": episode.n_shot + episode.n_query,
        "val": episode.n_shot + episode.n_query,
        "test": max(eval_shots) + episode.n_query,
    }
    left = []
    for split, min_count in need.items():
        table = load_split(Path(features.path), split)
        labels = [table.classes[c] for c in table.labels]
        check_usable(split, labels, episode.n_way, min_count, features.path)
        _, left_out = usable_classes(labels, min_count)
        if left_out:
            get_run_logger().warning(
                "data: split %s: %d class(es) have fewer than %d items and are left out of its episodes: %s",
                split,
                len(left_out),
                min_count,
                ", ".join(f"{c} ({n})" for c, n in sorted(left_out.items())),
            )
        left.append((split, len(left_out)))
    return tuple(left)


@task(name="released-model", cache_policy=CACHE, persist_result=True)
def released_model(
    backbone: FewShotBackboneParams, dataset: str, episode: EpisodeShape, work_dir: str
) -> ReleasedModel:
    """The authors' netSSRBest.pth (``released_checkpoint``) checked and unpacked: backbone
    and SSR weights; no pretraining and no training follow. The files are named after the
    checkpoint's content (``unpack_released``)."""
    released = unpack_released(
        required(backbone.released_checkpoint, "backbone.released_checkpoint"),
        backbone.name,
        spec_name(dataset),
        episode.n_way,
        episode.n_query,
        Path(work_dir),
    )
    get_run_logger().info(
        "released model %s: %s backbone, SSR with %d steps, hidden %d; skipping pretraining and training",
        released.source,
        backbone.name,
        released.steps,
        released.hidden,
    )
    return released


# data_identity(data.root) in the name: the built-in data is re-rendered in place under the same path.
@task(name="extract-features", cache_policy=CACHE, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def extract_features(data: FewShotData, backbone: Backbone, work_dir: str, device: Device = "auto") -> Features:
    """Features of the train, val and test splits in one features table."""
    splits = ("train", "val", "test")
    out = Path(work_dir) / f"features-{short_hash([backbone.path, data_identity(data.root), splits])}.parquet"
    get_run_logger().info("features: extracting %s into %s", ", ".join(splits), out.name)
    path = extract_features_to(
        Path(data.root),
        backbone.spec,
        backbone.name,
        Path(backbone.path),
        out,
        splits=splits,
        device=local_device(device),
    )
    return Features(str(path), int(read_metadata(path)["dim"]))


@task(name="validation-episodes", cache_policy=CACHE, persist_result=True)
def validation_episodes(
    n_val_episodes: int,
    episode: EpisodeShape,
    seed: int,
    features: Features,
    data: FewShotData,
    work_dir: str,
    query_balance: str = "balanced",
) -> ValidationEpisodes:
    """Fixed validation episodes as index arrays (.npz): the SIB JSON when present, else seeded;
    reused when the file for the same features, source and shape exists. query_balance
    dirichlet:ALPHA: seeded episodes whose query class counts are drawn as the test's (the
    SIB JSON holds balanced ones), for a model trained so (``train.query_balance``)."""
    alpha = query_balance_alpha(query_balance)
    json_path = data.val_episodes_json if alpha is None else None
    key = [features.path, json_path, n_val_episodes, asdict(episode), seed] + ([] if alpha is None else [query_balance])
    out = Path(work_dir) / f"val-episodes-{short_hash(key)}.npz"
    if out.exists():
        eps = EpisodeIndices.load(out)
        get_run_logger().info("validation: reusing %d %d-way episodes (%s)", len(eps), episode.n_way, out.name)
        return ValidationEpisodes(str(out))
    val = load_split(Path(features.path), "val")
    if json_path:
        eps = fixed_episodes(val, Path(json_path), limit=n_val_episodes)
    else:
        n_way, n_shot, n_query = episode.n_way, episode.n_shot, episode.n_query
        eps = sample_balanced_or_dirichlet(val, n_val_episodes, n_way, n_shot, n_query, alpha, seed=10_000 + seed)
    eps.save(out)
    get_run_logger().info(
        "validation: %d fixed %d-way %d-shot episodes, queries %s",
        len(eps),
        episode.n_way,
        eps.support.shape[2],
        query_balance,
    )
    return ValidationEpisodes(str(out))


@task(name="training-features", cache_policy=CACHE, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def training_features(
    train_augment: str, seed: int, data: FewShotData, backbone: Backbone, work_dir: str, device: Device = "auto"
) -> TrainingFeatures:
    """Where training episodes take their features (``train_augment``); for ``views:N`` the
    N augmented views of every training image are extracted here, once."""
    augment = TrainAugment.parse(train_augment)
    views = None
    if augment.mode == "views":
        out = Path(work_dir) / f"views-{short_hash([backbone.path, data.root, augment.n_views, seed])}.parquet"
        get_run_logger().info(
            "training features: %d augmented views of every training image into %s", augment.n_views, out.name
        )
        net = load_backbone(backbone.name, backbone.spec, Path(backbone.path))
        meta = {
            "dataset": backbone.spec,
            "backbone": backbone.name,
            "checkpoint_hash": file_sha256(Path(backbone.path)),
        }
        views = str(
            extract_views(
                Path(data.root), backbone.spec, net, augment.n_views, out, meta, seed=seed, device=local_device(device)
            )
        )
    elif augment.mode == "online":
        get_run_logger().info(
            "training features: online, the training augmentation of %s through the frozen backbone every episode",
            backbone.spec,
        )
    return TrainingFeatures(augment.mode, data.root, backbone, views)


@task(name="scale-lr-dni", cache_policy=CACHE, persist_result=True)
def scaled_sweep(sweep: Sweep, features: Features) -> Sweep:
    """``from_data``: the sweep's lr_dni values (default: the train group's) times the mean
    squared norm of the train split's features. The DNI update moves a feature by
    lr_dni x gradient, and the gradient of a cosine falls as 1/|x|, so its effect on the
    cosines falls as lr_dni / |x|^2: the values given are per unit norm."""
    train = load_split(Path(features.path), "train")
    sq_norm = float(np.mean(np.sum(train.embeddings.astype(np.float64) ** 2, axis=1)))
    scaled = [float(f"{v * sq_norm:.3g}") for v in sweep.get("lr_dni", [])]
    get_run_logger().info(
        "settings from the data: mean squared feature norm %.4g; lr_dni %s -> %s", sq_norm, sweep.get("lr_dni"), scaled
    )
    return {**sweep, "lr_dni": scaled} if scaled else dict(sweep)


def training_shots(train: FewShotTrainParams, sweep: Sweep) -> list[int]:
    """The shot counts trials train at: the train group's n_shot, or those ``sweep.n_shot`` lists."""
    return sorted({int(p.get("n_shot", train.n_shot)) for p in sweep_points(sweep)})


@task(name="train-ssr", retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def train_ssr(
    train: FewShotTrainParams,
    sweep: Sweep,
    features: Features,
    val: ValidationEpisodes,
    work_dir: str,
    training: TrainingFeatures | None = None,
    tracking: TrialTracking | None = None,
    device: Device = "auto",
    val_by_shot: tuple[tuple[int, str, ValidationEpisodes], ...] = (),
    balances: tuple[str, ...] = (),
) -> FewShotTrials:
    """Ray Tune grid over the points of ``sweep``; each trial runs the steps curriculum and checkpoints.

    training: where episodes take their features (``training_features``); None: the features table.
    tracking: each trial logs to its nested MLflow run while it trains.
    val_by_shot: validation episodes per (shot count, query balance), for a sweep over n_shot
    or several query balances (default: ``val``).
    balances: the query balances to train with (``FewShotParams.training_balances``), one
    trial per point of the sweep each; empty or the train group's own: the sweep as it is.
    """
    inputs = FewShotTrialInputs(
        features.path,
        val.path,
        training if training and training.mode != "none" else None,
        tuple((shot, balance, v.path) for shot, balance, v in val_by_shot),
    )
    if balances and list(balances) != [train.trained_balance]:
        sweep = {**sweep, "query_balance": list(balances)}  # type: ignore[dict-item,arg-type]  # a trial per balance (strings)
    # a trial's folder is named after its point; this one after everything else it depends on
    root = Path(work_dir) / f"ssr-{short_hash([train.model_dump(), asdict(inputs)])}"
    points = sweep_points(sweep)
    get_run_logger().info(
        "SSR: training %d trial(s) over %s, steps 1..%d, train_augment %s, checkpoints in %s",
        len(points),
        dict(sweep) or "no sweep",
        train.max_steps,
        train.train_augment,
        root,
    )
    progress = Progress(f"train-{short_hash([features.path, str(root)])}", "SSR training (all trials)")
    trials = Trials(
        tuple(
            run_trials(
                train,
                sweep,
                inputs,
                features.dim,
                root / "trials",
                Path(work_dir) / "ray_results",
                device=cluster_device(device),
                progress=progress,
                tracking=tracking,
            )
        )
    )
    best = trials.best
    get_run_logger().info(
        "SSR: best trial %s steps=%d val acc %.2f%%", best.label, best.best_steps, 100 * best.best_val
    )
    return trials


@task(name="choose-k-reciprocal", cache_policy=CACHE, persist_result=True)
def choose_krecip(
    baselines: FewShotBaselineParams,
    features: Features,
    val: ValidationEpisodes,
    n_actors: int = 0,
    device: Device = "auto",
) -> KReciprocal:
    """The k-reciprocal grid evaluated on validation episodes only; returns the best setting."""
    grid = [
        KReciprocal(k1, k2, lam)
        for k1 in baselines.krecip_k1
        for k2 in baselines.krecip_k2
        for lam in baselines.krecip_lambda
    ]
    res = evaluate_with_pool(
        Path(features.path),
        "val",
        val.load(),
        None,
        krecip=grid,
        with_ssr=False,
        n_actors=n_actors,
        device=cluster_device(device),
    )
    scores = {g: float(res.krecip[g].mean()) for g in grid}
    best = max(grid, key=scores.__getitem__)
    get_run_logger().info(
        "k-reciprocal: best on validation k1=%d k2=%d lambda=%.1f (%.2f%%)",
        best.k1,
        best.k2,
        best.lam,
        100 * scores[best],
    )
    return best


@task(name="evaluate-fewshot", retries=1, retry_condition_fn=retry_transient)
def evaluate(
    evaluation: FewShotEvalParams,
    episode: EpisodeShape,
    seed: int,
    features: Features,
    model: FewShotModel,
    krecip: KReciprocal,
    shot: int,
    device: Device = "auto",
    variants: tuple[tuple[str, FewShotModel], ...] = (),
) -> ShotResult:
    """Test episodes of the novel classes scored by Ray actors; per-episode accuracies and costs.

    Baseline, k-reciprocal and SSR are always scored; the peers of ``evaluation.methods`` on the
    same episodes. ``query_balance`` dirichlet:ALPHA draws the class counts of the queries.
    variants: the other SSR models by the query balance they were trained with, scored on the
    same episodes. The compositions of ``evaluation.methods`` (ssr+tim, ssr+pt-map) read the
    refined features of the variant trained with the test's query balance when there is one,
    else of ``model``.
    """
    test = load_split(Path(features.path), "test")
    seed = 20_000 + seed + shot
    alpha = evaluation.dirichlet_alpha
    n_way, n_query = episode.n_way, episode.n_query
    if alpha is None:
        eps = sample_episodes(test, evaluation.n_test_episodes, n_way, shot, n_query, seed=seed)
    else:
        eps = sample_dirichlet_episodes(
            test, evaluation.n_test_episodes, n_way, shot, n_way * n_query, alpha, seed=seed
        )
    repeated = repeated_query_fraction(eps)
    peers = [m for m in evaluation.methods if m in PEER_METHODS or m in COMPOSED_METHODS]
    variant_names = [b for b, _ in variants]
    compose_with = evaluation.query_balance if evaluation.query_balance in variant_names else ""
    progress = Progress(
        f"eval-{shot}shot-{short_hash([features.path, model.weights, peers, evaluation.query_balance, variants])}",
        f"Evaluation, {shot}-shot episodes",
    )
    get_run_logger().info(
        "evaluation: %d test episodes, %d-way %d-shot, queries %s%s, peers: %s",
        len(eps),
        n_way,
        shot,
        evaluation.query_balance,
        f" ({100 * repeated:.1f}% repeated)" if repeated else "",
        ", ".join(peers) or "none",
    )
    res = evaluate_with_pool(
        Path(features.path),
        "test",
        eps,
        model,
        krecip=[krecip],
        n_actors=evaluation.n_eval_actors,
        device=cluster_device(device),
        progress=progress,
        peers=peers,
        variants=variants,
        compose_with=compose_with,
    )
    keys = {
        "baseline": "baseline",
        krecip_key(krecip): "krecip",
        "ssr": "ssr",
        **{p: peer_key(p) for p in peers},
        **{variant_key(b): ssr_key(b) for b in variant_names},
    }
    cost = tuple(
        MethodCostRow(keys[k], c.ms_per_episode, c.peak_mib_per_episode, c.cpu_ms_per_episode)
        for k, c in res.cost.items()
    )
    return ShotResult(
        shot,
        tuple(res.baseline.tolist()),
        tuple(res.krecip[krecip].tolist()),
        tuple(tuple(a.tolist()) for a in res.ssr_by_step),
        tuple((p, tuple(res.peers[p].tolist())) for p in peers),
        cost,
        evaluation.query_balance,
        repeated,
        tuple((b, tuple(tuple(a.tolist()) for a in res.ssr_variants[b])) for b in variant_names),
    )


@task(name="validate-released", cache_policy=CACHE, persist_result=True)
def released_trials(
    train: FewShotTrainParams,
    features: Features,
    val: ValidationEpisodes,
    released: ReleasedModel,
    n_actors: int = 0,
    device: Device = "auto",
) -> FewShotTrials:
    """The released model as the only "trial", run with ``train`` (the sweep's first point):
    its accuracy on the validation episodes is its score (the registry's champion rule
    compares it like a trained one)."""
    # the authors' model was trained on balanced episodes, whatever train.query_balance asks
    model = released.model(train.model_copy(update={"query_balance": "balanced"}), features.dim)
    res = evaluate_with_pool(
        Path(features.path), "val", val.load(), model, n_actors=n_actors, device=cluster_device(device)
    )
    best_val = float(res.ssr_by_step[-1].mean())
    get_run_logger().info(
        "released model, run with lr_dni=%g: validation acc %.2f%% (baseline %.2f%%)",
        model.config.lr_dni,
        100 * best_val,
        100 * float(res.baseline.mean()),
    )
    return Trials(
        (FewShotTrial(model.config, "released", features.dim, (), released.steps, best_val, released.ssr_path),)
    )
