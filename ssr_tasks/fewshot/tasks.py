"""The few-shot steps as Prefect tasks: thin wrappers over the plain code of this package.

Each returns a typed hand-off (``ssr_tasks.fewshot.handoffs``) of file paths and scalars.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from ssr_tasks.backbone import extract_features as extract_features_to
from ssr_tasks.backbone import load_backbone, spec_name
from ssr_tasks.config import FewShotParams
from ssr_tasks.device import cluster_device, local_device
from ssr_model.baselines import PEER_METHODS
from ssr_tasks.fewshot.episodes import (fixed_episodes, load_split, repeated_query_fraction, sample_dirichlet_episodes,
                                        sample_episodes)
from ssr_tasks.fewshot.evaluate import krecip_key
from ssr_tasks.fewshot.handoffs import (FewShotData, FewShotModel, FewShotTrial, FewShotTrials, KReciprocal, MethodCostRow,
                                        ReleasedModel, ShotResult, TrainingFeatures, ValidationEpisodes, peer_key)
from ssr_tasks.fewshot.ray_jobs import evaluate_with_pool, run_trials
from ssr_tasks.fewshot.released import unpack_released
from ssr_tasks.fewshot.train import TrainConfig
from ssr_tasks.fewshot.train_features import TrainAugment, extract_views
from ssr_tasks.handoffs import Backbone, Features, TrialTracking, Trials
from ssr_tasks.taskkit import Progress, cached, retry_transient, short_hash
from storage.features import read_metadata
from storage.checkpoints import file_sha256
from storage.fewshot import data_identity, find_val_episodes, list_split
from storage.glyphs import prepare_glyphs


@task(name="prepare-data", cache_policy=cached("dataset", "data_root", "val_episodes_json", "glyphs_size", "data_seed",
                                                    "n_way", "n_shot_train", "n_query"), persist_result=True,
      retries=1, retry_condition_fn=retry_transient)
def prepare_data(params: FewShotParams, run_dir: str) -> FewShotData:
    """Built-in glyphs (rendered once per seed/size) or a real dataset root, checked."""
    logger = get_run_logger()
    if params.dataset == "glyphs":
        info = prepare_glyphs(Path(run_dir) / "data", seed=params.data_seed, size=params.glyphs_size)
        root = Path(info["fewshot_root"])
        val_json = root / f"val_episodes_{params.n_shot_train}shot.json"
    else:
        root = Path(params.data_root).expanduser().resolve()
        val_json = Path(params.val_episodes_json) if params.val_episodes_json else None
        if val_json is None:
            val_json = find_val_episodes(root, params.n_way, params.n_shot_train, params.n_query)
            if val_json is not None:
                logger.info("validation: %s holds the authors' fixed episodes; validating on %s (set "
                            "val_episodes_json to use others)", root.name, val_json.name)
    for split in ("train", "val", "test"):
        idx = list_split(root, split)
        logger.info("data: %s/%s has %d classes, %d images", root.name, split, len(idx.classes), len(idx.paths))
    return FewShotData(str(root), str(val_json) if val_json and val_json.exists() else None)


@task(name="released-model", cache_policy=cached("released_checkpoint", "backbone", "dataset", "n_way", "n_query"),
      persist_result=True)
def released_model(params: FewShotParams, work_dir: str) -> ReleasedModel:
    """The authors' netSSRBest.pth (``released_checkpoint``) checked and unpacked: backbone
    and SSR weights; no pretraining and no training follow. The files are named after the
    checkpoint's content (``unpack_released``)."""
    released = unpack_released(params.released_checkpoint, params.backbone, spec_name(params.dataset), params.n_way,
                               params.n_query, Path(work_dir))
    get_run_logger().info("released model %s: %s backbone, SSR with %d steps, hidden %d; skipping pretraining and "
                          "training", released.source, params.backbone, released.steps, released.hidden)
    return released


# data_seed and glyphs_size: the built-in data is re-rendered in place under the same path.
@task(name="extract-features", cache_policy=cached("dataset", "data_seed", "glyphs_size"), persist_result=True,
      retries=1, retry_condition_fn=retry_transient)
def extract_features(params: FewShotParams, data: FewShotData, backbone: Backbone, work_dir: str) -> Features:
    """Features of the train, val and test splits in one features table."""
    splits = ("train", "val", "test")
    out = Path(work_dir) / f"features-{short_hash([backbone.path, data_identity(data.root), splits])}.parquet"
    get_run_logger().info("features: extracting %s into %s", ", ".join(splits), out.name)
    path = extract_features_to(Path(data.root), spec_name(params.dataset), backbone.name, Path(backbone.path), out,
                               splits=splits, device=local_device(params.device))
    return Features(str(path), int(read_metadata(path)["dim"]))


@task(name="validation-episodes", cache_policy=cached("n_val_episodes", "n_way", "n_shot_train", "n_query", "seed"), persist_result=True)
def validation_episodes(params: FewShotParams, features: Features, data: FewShotData, work_dir: str) -> ValidationEpisodes:
    """Fixed validation episodes as index arrays (.npz): the SIB JSON when present, else seeded."""
    val = load_split(Path(features.path), "val")
    if data.val_episodes_json:
        eps = fixed_episodes(val, Path(data.val_episodes_json), limit=params.n_val_episodes)
    else:
        eps = sample_episodes(val, params.n_val_episodes, params.n_way, params.n_shot_train, params.n_query, seed=10_000 + params.seed)
    out = Path(work_dir) / f"val-episodes-{short_hash([features.path, data.val_episodes_json, params.n_val_episodes])}.npz"
    eps.save(out)
    get_run_logger().info("validation: %d fixed %d-way %d-shot episodes", len(eps), params.n_way, eps.support.shape[2])
    return ValidationEpisodes(str(out))


def train_config(params: FewShotParams, feat_dim: int, *, hidden: int | None = None,
                 max_steps: int | None = None) -> TrainConfig:
    """The training config of the first trial of the grid (each trial replaces lr_dni).

    hidden, max_steps: given, they replace the params' (a released model brings its own), and
    those fields of ``params`` are not read."""
    return TrainConfig(
        feat_dim=feat_dim, n_way=params.n_way, n_shot=params.n_shot_train, n_query=params.n_query,
        hidden=params.hidden if hidden is None else hidden, lr_dni=params.lr_dni_grid[0],
        max_steps=params.max_steps if max_steps is None else max_steps,
        iterations_first=params.iterations_first, iterations_next=params.iterations_next,
        lr_first=params.lr_first, lr_next=params.lr_next, batch_episodes=params.batch_episodes,
        val_every=params.val_every, seed=params.seed,
    )


@task(name="training-features", cache_policy=cached("train_augment", "seed"), persist_result=True,
      retries=1, retry_condition_fn=retry_transient)
def training_features(params: FewShotParams, data: FewShotData, backbone: Backbone, work_dir: str) -> TrainingFeatures:
    """Where training episodes take their features (``train_augment``); for ``views:N`` the
    N augmented views of every training image are extracted here, once."""
    augment = TrainAugment.parse(params.train_augment)
    views = None
    if augment.mode == "views":
        out = Path(work_dir) / f"views-{short_hash([backbone.path, data.root, augment.n_views, params.seed])}.parquet"
        get_run_logger().info("training features: %d augmented views of every training image into %s",
                              augment.n_views, out.name)
        net = load_backbone(backbone.name, backbone.spec, Path(backbone.path))
        meta = {"dataset": backbone.spec, "backbone": backbone.name, "checkpoint_hash": file_sha256(Path(backbone.path))}
        views = str(extract_views(Path(data.root), backbone.spec, net, augment.n_views, out, meta, seed=params.seed,
                                  device=local_device(params.device)))
    elif augment.mode == "online":
        get_run_logger().info("training features: online, the training augmentation of %s through the frozen backbone "
                              "every episode", backbone.spec)
    return TrainingFeatures(augment.mode, data.root, backbone, views)


@task(name="train-ssr", retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def train_ssr(params: FewShotParams, features: Features, val: ValidationEpisodes, work_dir: str,
              training: TrainingFeatures | None = None, tracking: TrialTracking | None = None) -> FewShotTrials:
    """Ray Tune grid over lr_dni; each trial runs the steps curriculum and checkpoints.

    training: where episodes take their features (``training_features``); None: the features table.
    tracking: each trial logs to its nested MLflow run while it trains.
    """
    base = train_config(params, features.dim)
    key = {k: v for k, v in asdict(base).items() if k != "lr_dni"}
    if training is not None and training.mode != "none":  # augmented features train another model: other checkpoints
        key["augment"] = training.as_inputs()
    root = Path(work_dir) / f"ssr-{short_hash(key)}"
    get_run_logger().info("SSR: training %d trial(s) lr_dni=%s, steps 1..%d, train_augment %s, checkpoints in %s",
                          len(params.lr_dni_grid), params.lr_dni_grid, params.max_steps, params.train_augment, root)
    progress = Progress(f"train-{short_hash([features.path, str(root)])}", "SSR training (all trials)")
    trials = Trials(tuple(run_trials(base, params.lr_dni_grid, Path(features.path), Path(val.path), root / "trials",
                                     Path(work_dir) / "ray_results", device=cluster_device(params.device),
                                     progress=progress, training=training.as_inputs() if training else None,
                                     tracking=tracking)))
    best = trials.best
    get_run_logger().info("SSR: best trial lr_dni=%g steps=%d val acc %.2f%%", best.lr_dni, best.best_steps, 100 * best.best_val)
    return trials


@task(name="choose-k-reciprocal", cache_policy=cached("krecip_k1", "krecip_k2", "krecip_lambda"), persist_result=True)
def choose_krecip(params: FewShotParams, features: Features, val: ValidationEpisodes) -> KReciprocal:
    """The k-reciprocal grid evaluated on validation episodes only; returns the best setting."""
    grid = [KReciprocal(k1, k2, lam) for k1 in params.krecip_k1 for k2 in params.krecip_k2 for lam in params.krecip_lambda]
    res = evaluate_with_pool(Path(features.path), "val", val.load(), None, krecip=grid, with_ssr=False,
                             n_actors=params.n_eval_actors, device=cluster_device(params.device))
    scores = {g: float(res.krecip[g].mean()) for g in grid}
    best = max(grid, key=scores.__getitem__)
    get_run_logger().info("k-reciprocal: best on validation k1=%d k2=%d lambda=%.1f (%.2f%%)",
                          best.k1, best.k2, best.lam, 100 * scores[best])
    return best


@task(name="evaluate-fewshot", retries=1, retry_condition_fn=retry_transient)
def evaluate(params: FewShotParams, features: Features, model: FewShotModel, krecip: KReciprocal, shot: int) -> ShotResult:
    """Test episodes of the novel classes scored by Ray actors; per-episode accuracies and costs.

    Baseline, k-reciprocal and SSR are always scored; the peers of ``params.methods`` on the
    same episodes. ``query_balance`` dirichlet:ALPHA draws the class counts of the queries.
    """
    test = load_split(Path(features.path), "test")
    seed = 20_000 + params.seed + shot
    alpha = params.dirichlet_alpha
    if alpha is None:
        eps = sample_episodes(test, params.n_test_episodes, params.n_way, shot, params.n_query, seed=seed)
    else:
        eps = sample_dirichlet_episodes(test, params.n_test_episodes, params.n_way, shot, params.n_way * params.n_query,
                                        alpha, seed=seed)
    repeated = repeated_query_fraction(eps)
    peers = [m for m in params.methods if m in PEER_METHODS]
    progress = Progress(f"eval-{shot}shot-{short_hash([features.path, model.weights, peers, params.query_balance])}",
                        f"Evaluation, {shot}-shot episodes")
    get_run_logger().info("evaluation: %d test episodes, %d-way %d-shot, queries %s%s, peers: %s", len(eps), params.n_way,
                          shot, params.query_balance, f" ({100 * repeated:.1f}% repeated)" if repeated else "",
                          ", ".join(peers) or "none")
    res = evaluate_with_pool(Path(features.path), "test", eps, model, krecip=[krecip], n_actors=params.n_eval_actors,
                             device=cluster_device(params.device), progress=progress, peers=peers)
    keys = {"baseline": "baseline", krecip_key(krecip): "krecip", "ssr": "ssr", **{p: peer_key(p) for p in peers}}
    cost = tuple(MethodCostRow(keys[k], c.ms_per_episode, c.peak_mib_per_episode, c.cpu_ms_per_episode)
                 for k, c in res.cost.items())
    return ShotResult(shot, tuple(res.baseline.tolist()), tuple(res.krecip[krecip].tolist()),
                      tuple(tuple(a.tolist()) for a in res.ssr_by_step),
                      tuple((p, tuple(res.peers[p].tolist())) for p in peers), cost, params.query_balance, repeated)


# The fields of train_config but hidden and max_steps (the released model's own replace them):
# lr_dni_grid[0] is the step size it runs with; the rest are in the trial's config it returns.
@task(name="validate-released", cache_policy=cached("n_way", "n_shot_train", "n_query", "lr_dni_grid", "iterations_first",
                                                    "iterations_next", "lr_first", "lr_next", "batch_episodes",
                                                    "val_every", "seed"), persist_result=True)
def released_trials(params: FewShotParams, features: Features, val: ValidationEpisodes,
                    released: ReleasedModel) -> FewShotTrials:
    """The released model as the only "trial": its accuracy on the validation episodes is
    its score (the registry's champion rule compares it like a trained one)."""
    model = released.model(train_config(params, features.dim, hidden=released.hidden, max_steps=released.steps))
    res = evaluate_with_pool(Path(features.path), "val", val.load(), model, n_actors=params.n_eval_actors,
                             device=cluster_device(params.device))
    best_val = float(res.ssr_by_step[-1].mean())
    get_run_logger().info("released model, run with lr_dni=%g: validation acc %.2f%% (baseline %.2f%%)",
                          model.config.lr_dni, 100 * best_val, 100 * float(res.baseline.mean()))
    return Trials((FewShotTrial(model.config, (), released.steps, best_val, released.ssr_path),))
