"""Nothing lost: killed actors and trials, failing trials, unreachable services, full disks.

Processes are killed for real (SIGKILL). The fault points live here, in the tests: the
``faults`` fixture gives a marker folder, and the product's Ray worker class or Tune
trainable is swapped for a test subclass or wrapper (defined inside a fixture, so Ray ships
it by value to its workers) that kills its process once at an exact point when the
point's marker file exists: the first process to remove the marker dies, like an
out-of-memory kill or a lost node would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import ssr_tasks.fewshot.ray_jobs
import ssr_tasks.retrieval.rerank
from ssr_model import FewShotSSR
from ssr_model.packaged import FewShotClassifier
from ssr_tasks.config import FewShotTrainParams, RetrievalTrainParams
from ssr_tasks.fewshot.episodes import load_split, sample_episodes
from ssr_tasks.fewshot.ray_jobs import FewShotTrialInputs, run_trials
from ssr_tasks.fewshot.train import train_curriculum
from ssr_tasks.ray_grid import trial_dir, tune_grid
from ssr_tasks.retrieval.handoffs import RetrievalModel
from ssr_tasks.retrieval.rerank import ShardReranker, rerank_store
from ssr_tasks.services import ServiceUnreachable
from ssr_tasks.tracking import Tracker
from storage.features import write_features
from storage.simstore import SimilarityStore, build_topk_store, create_store

SSR = str(Path(sys.executable).parent / "ssr")


@pytest.fixture
def faults(tmp_path):
    """The fault-marker folder of a test: touch ``<faults>/<point>`` to kill at that point once."""
    path = tmp_path / "faults"
    path.mkdir()
    return path


def make_kill_once():
    """``kill_once(marker)``: SIGKILL this process if it is the first to remove ``marker``.

    Made inside a function so that Ray ships it to workers by value (this test module is
    not importable there).
    """

    def kill_once(marker: Path) -> None:
        try:
            marker.unlink()  # only one process wins the unlink
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    return kill_once


@pytest.fixture
def killing_rerankers(faults, monkeypatch):
    """Re-ranking actors with the fault points ``rerank-shard-<i>-before-write`` / ``-after-write``."""
    kill = make_kill_once()

    class KillingReranker(ShardReranker):
        def rerank_shard(self, store_dir, query_features, out_dir, shard):
            kill(faults / f"rerank-shard-{shard}-before-write")
            done = super().rerank_shard(store_dir, query_features, out_dir, shard)
            kill(faults / f"rerank-shard-{shard}-after-write")
            return done

    monkeypatch.setattr(ssr_tasks.retrieval.rerank, "ShardReranker", KillingReranker)
    return faults


@pytest.fixture
def killing_fewshot_trials(faults, monkeypatch):
    """Few-shot Tune trials with the fault point ``fewshot-trial-after-validation`` (after a
    validation was reported, so its checkpoint is on disk)."""
    kill = make_kill_once()

    def killing_trial(trial):
        from ray import tune

        from ssr_tasks.fewshot.ray_jobs import fewshot_trial  # the product's trainable (unpatched in the worker)

        real_report = tune.report

        def report(metrics, *args, **kwargs):
            real_report(metrics, *args, **kwargs)
            if "val_acc" in metrics:
                kill(faults / "fewshot-trial-after-validation")

        tune.report = report
        try:
            return fewshot_trial(trial)
        finally:
            tune.report = real_report

    monkeypatch.setattr(ssr_tasks.fewshot.ray_jobs, "fewshot_trial", killing_trial)
    return faults


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a re-ranking actor killed mid-shard -------------------------------------------------------

D, K_STORE, K, N_DB, N_Q, SHARD = 12, 10, 6, 80, 25, 7  # 4 shards: 0, 1, 2, 3


@pytest.fixture(scope="module")
def rerank_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank-faults")
    rng = np.random.default_rng(1)
    db = rng.normal(size=(N_DB, D)).astype(np.float32)
    q = rng.normal(size=(N_Q, D)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    meta = {"dataset": "t", "backbone": "t", "checkpoint_hash": "-", "dim": str(D)}
    write_features(
        root / "db.parquet", ids=np.arange(N_DB), labels=["db"] * N_DB, splits="database", embeddings=db, metadata=meta
    )
    write_features(
        root / "q.parquet", ids=np.arange(N_Q), labels=["q"] * N_Q, splits="query", embeddings=q, metadata=meta
    )
    build_topk_store(q, np.arange(N_Q), db, np.arange(N_DB), root / "topk", K_STORE, shard_size=SHARD)
    torch.manual_seed(0)
    cfg = RetrievalTrainParams(k=K, steps=1, lr_dni=0.5, hidden=16)
    torch.save(cfg.build(D).state_dict(), root / "model.pt")
    model = RetrievalModel(str(root / "model.pt"), cfg, D)
    # the undisturbed result, computed in this process shard by shard
    worker = ShardReranker(str(root / "db.parquet"), model)
    clean = {}
    create_store(root / "clean", K_STORE, N_Q, 4, SHARD)
    for i in range(SimilarityStore(root / "topk").n_shards):
        worker.rerank_shard(str(root / "topk"), str(root / "q.parquet"), str(root / "clean"), i)
    src = SimilarityStore(root / "topk")
    # read the clean shards directly (the plain worker does not touch the manifest)
    for i in range(src.n_shards):
        t = pq.read_table(root / "clean" / f"part-{i:05d}.parquet").to_pydict()
        for qid, ids, sc in zip(t["query_id"], t["neighbor_ids"], t["scores"]):
            clean[qid] = (np.asarray(ids), np.asarray(sc, np.float32))
    return root, model, clean


def rows_of(store_dir: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    return [
        (int(qid), ids, sc)
        for shard in SimilarityStore(store_dir).iter_shards()
        for qid, ids, sc in zip(shard.query_ids, shard.neighbor_ids, shard.scores)
    ]


@pytest.mark.parametrize(
    "shard, phase",
    [(0, "before-write"), (2, "after-write"), (3, "before-write")],
    ids=["first-shard", "middle-shard", "last-shard"],
)
def test_actor_killed_mid_shard_completes_with_every_query_once(
    rerank_setup, killing_rerankers, ray_local, tmp_path, shard, phase
):
    root, model, clean = rerank_setup
    marker = killing_rerankers / f"rerank-shard-{shard}-{phase}"
    marker.touch()
    out = rerank_store(root / "topk", root / "q.parquet", root / "db.parquet", tmp_path / "reranked", model, n_actors=2)
    assert not marker.exists(), "the actor was not killed (marker still there)"
    store = SimilarityStore(out)
    assert store.is_complete()
    store.validate()
    rows = rows_of(out)
    assert sorted(q for q, _, _ in rows) == list(range(N_Q))  # every query exactly once
    for qid, ids, sc in rows:
        np.testing.assert_array_equal(ids, clean[qid][0])
        np.testing.assert_array_equal(sc, clean[qid][1])
    assert not list(Path(out).glob(".*.tmp"))  # no temporary file left behind


# ---- training killed ---------------------------------------------------------------------------


def small_cfg(**kw):
    base = dict(
        n_way=3,
        n_shot=1,
        n_query=4,
        hidden=16,
        lr_dni=1e-2,
        max_steps=2,
        iterations_first=8,
        iterations_next=4,
        batch_episodes=2,
        val_every=4,
        seed=3,
    )
    return FewShotTrainParams(**{**base, **kw})  # on the 16-wide synthetic features


@pytest.mark.slow
def test_killed_tune_trial_resumes_to_the_undisturbed_model(
    synthetic_features, killing_fewshot_trials, ray_local, tmp_path
):
    cfg = small_cfg()
    train, val = load_split(synthetic_features, "train"), load_split(synthetic_features, "val")
    eps = sample_episodes(val, 6, 3, 1, 4, seed=5)
    eps.save(tmp_path / "val.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial
    try:
        clean = train_curriculum(cfg, train, val, eps, tmp_path / "clean")
    finally:
        torch.set_num_threads(threads)

    marker = killing_fewshot_trials / "fewshot-trial-after-validation"
    marker.touch()
    ckpts, storage = tmp_path / "trials", tmp_path / "ray"
    inputs, sweep = FewShotTrialInputs(str(synthetic_features), str(tmp_path / "val.npz")), {"lr_dni": [0.01]}
    with pytest.raises(RuntimeError, match=r"1 trial\(s\) of fewshot-ssr-\w+ failed"):
        run_trials(cfg, sweep, inputs, 16, ckpts, storage, max_failures=0)
    assert not marker.exists()
    assert not trial_dir(ckpts, {"lr_dni": 0.01}).exists()  # only finished trials land there
    # The trial's last Tune checkpoint: its workspace after the first validation (killed right after it).
    [last] = storage.glob("fewshot-ssr-*/*/checkpoint_*/steps1/last.pt")
    assert torch.load(last, weights_only=True)["done"] == 4

    [resumed] = run_trials(cfg, sweep, inputs, 16, ckpts, storage, max_failures=0)
    assert (resumed.label, resumed.config, resumed.feat_dim) == ("lr_dni=0.01", cfg, 16)
    # Restored, not restarted: Tune's record of the trial's reports holds each validation once.
    [record] = storage.glob("fewshot-ssr-*/*/result.json")
    reported = [
        (r["steps"], r["iteration"]) for r in map(json.loads, record.read_text().splitlines()) if "val_acc" in r
    ]
    assert reported == [(1, 4), (1, 8), (2, 4)]
    assert resumed.best_val == pytest.approx(clean["best_val"]) and resumed.best_steps == clean["best_steps"]
    a = torch.load(clean["best_path"], weights_only=True)
    b = torch.load(resumed.best_path, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_transient_trial_failure_is_retried(ray_local, tmp_path):
    marker_path = str(tmp_path / "m")

    def flaky(config):
        from pathlib import Path

        from ray import tune

        marker = Path(marker_path)
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("transient glitch")
        tune.report({"ok": 1})

    tune_grid(flaky, {"x=1": {"x": 1}}, "flaky", tmp_path / "ray", max_failures=2)
    assert (tmp_path / "m").exists()


def test_trial_that_always_fails_is_reported_with_its_reason(ray_local, tmp_path):
    def broken(config):
        raise RuntimeError(f"features file {config['points'][config['label']]['x']} is unreadable")

    t0 = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"1 trial\(s\) of broken failed after 1 retries: .*features file 7 is unreadable"
    ):
        tune_grid(broken, {"x=7": {"x": 7}}, "broken", tmp_path / "ray", max_failures=1)
    assert time.monotonic() - t0 < 240


# ---- unreachable services ----------------------------------------------------------------------


def test_unreachable_mlflow_fails_within_seconds_naming_the_url(tmp_path):
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=rf"MLflow tracking server at http://127.0.0.1:{port} is unreachable"):
        Tracker("x", tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "var, named", [("PREFECT_API_URL", "Prefect API"), ("MLFLOW_TRACKING_URI", "MLflow tracking server")]
)
def test_cli_run_with_unreachable_server_fails_fast(tmp_path, var, named):
    port = closed_port()
    url = f"http://127.0.0.1:{port}" + ("/api" if var == "PREFECT_API_URL" else "")
    env = {**os.environ, var: url, "SSR_HOME": str(tmp_path / "home")}
    t0 = time.monotonic()
    out = subprocess.run(
        [SSR, "run", "fewshot", "--preset", "reproduce-fewshot-tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = time.monotonic() - t0
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"{named}" in out.stderr and url in out.stderr and "unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "home").exists()  # nothing ran
    assert took < 120  # mostly interpreter start and imports on a loaded machine; the check itself is 5 s at most


def test_failed_alias_move_never_leaves_an_alias_on_a_missing_version(tmp_path, monkeypatch):
    tracker = Tracker("aliases", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = FewShotClassifier(FewShotSSR(8, 2, 4, 1, hidden=8).eval())
    tags = {"dataset": "d", "backbone": "b"}
    with tracker.run("v1"):
        tracker.log_and_register(model, "m", tags, val_metric=10.0)
    real = tracker.client.set_registered_model_alias

    def fail_on_champion(name, alias, version):
        if alias == "champion":
            raise RuntimeError("registry write failed")
        return real(name, alias, version)

    monkeypatch.setattr(tracker.client, "set_registered_model_alias", fail_on_champion)
    with tracker.run("v2"), pytest.raises(RuntimeError, match="registry write failed"):
        tracker.log_and_register(model, "m", tags, val_metric=20.0)  # moves the pair alias, then fails
    versions = {int(mv.version) for mv in tracker.client.search_model_versions("name='m'")}
    assert versions == {1}
    aliases = {a: str(v) for a, v in tracker.client.get_registered_model("m").aliases.items()}
    assert aliases == {"champion": "1", "champion-d-b": "1"}  # both still on the surviving version


# ---- a full disk or an unwritable output folder ------------------------------------------------


def test_disk_full_while_writing_a_shard_leaves_no_partial_file(rerank_setup, tmp_path, monkeypatch):
    root, model, _ = rerank_setup
    src = SimilarityStore(root / "topk")
    out = create_store(tmp_path / "out", src.k, src.n_queries, src.n_shards, src.shard_size, src.source_hashes)
    worker = ShardReranker(str(root / "db.parquet"), model)
    real_write = pq.write_table

    def write_then_fill_disk(table, where, **kw):
        real_write(table.slice(0, 1), where, **kw)  # something reached the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pq, "write_table", write_then_fill_disk)
    with pytest.raises(OSError, match="No space left on device") as exc:
        worker.rerank_shard(str(root / "topk"), str(root / "q.parquet"), str(out.path), 1)
    assert exc.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.path.iterdir()) == ["_manifest.json"]  # no part file, no temp file
    assert SimilarityStore(out.path).pending_shards() == [0, 1, 2, 3]


def test_disk_full_at_rename_while_writing_features_leaves_no_file(tmp_path, monkeypatch):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        write_features(
            tmp_path / "features.parquet",
            ids=np.arange(3),
            labels=[0, 1, 2],
            splits="train",
            embeddings=np.ones((3, 4), np.float32),
            metadata={"dataset": "d", "backbone": "b", "checkpoint_hash": "-"},
        )
    assert list(tmp_path.iterdir()) == []


def test_output_folder_under_a_file_is_a_clear_error(rerank_setup, tmp_path, ray_local):
    root, model, _ = rerank_setup
    (tmp_path / "not-a-dir").write_text("x")
    bad = tmp_path / "not-a-dir" / "reranked"
    with pytest.raises(OSError) as exc:
        rerank_store(root / "topk", root / "q.parquet", root / "db.parquet", bad, model, n_actors=1)
    assert "not-a-dir" in str(exc.value)
    assert (tmp_path / "not-a-dir").read_text() == "x"
