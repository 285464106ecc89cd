"""`ssr rerank`: anyone's features tables re-ranked by a model from a real MLflow registry
(SQLite) on real Ray actors, with revisited mAP before and after; bad input exits 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.cli import main
from ssr_model import RetrievalSSR
from ssr_model.metrics import revisited_map
from ssr_model.packaged import RetrievalReranker
from ssr_tasks.tracking import Tracker
from storage.features import write_features
from storage.landmarks import RevisitedGroundTruth, write_gnd_json
from storage.simstore import SimilarityStore

D, K, N_DB, N_Q = 12, 5, 60, 7
META = {"dataset": "mine", "backbone": "mine", "checkpoint_hash": "-"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A retrieval model registered as ssr-retrieval-cli@champion in a SQLite MLflow."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker("rerank-cli", root, tracking_uri=uri)
    torch.manual_seed(0)
    with tracker.run("train"):
        tracker.log_and_register(
            RetrievalReranker(RetrievalSSR(D, K, 1, lr_dni=0.5, hidden=16)),
            "ssr-retrieval-cli",
            tags={"dataset": "mine", "backbone": "mine"},
            val_metric=1.0,
        )
    return uri


@pytest.fixture
def tables(tmp_path):
    """Queries (ids 500..) and a database whose ids are not its rows; ground truth over rows."""
    rng = np.random.default_rng(0)
    db = rng.normal(size=(N_DB, D)).astype(np.float32)
    q = (db[:N_Q] + 0.3 * rng.normal(size=(N_Q, D))).astype(np.float32)
    db_ids = 1000 + 3 * rng.permutation(N_DB)
    write_features(
        tmp_path / "q.parquet", ids=500 + np.arange(N_Q), labels=[0] * N_Q, splits="query", embeddings=q, metadata=META
    )
    write_features(
        tmp_path / "db.parquet", ids=db_ids, labels=[0] * N_DB, splits="database", embeddings=db, metadata=META
    )
    gnd = [
        {"easy": np.array([i]), "hard": np.array([(i + 1) % N_DB]), "junk": np.array([], np.int64), "bbx": None}
        for i in range(N_Q)
    ]
    write_gnd_json(
        tmp_path / "gnd.json", RevisitedGroundTruth([str(i) for i in range(N_DB)], [str(i) for i in range(N_Q)], gnd)
    )
    return tmp_path, q, db, db_ids, gnd


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_rerank_with_the_registered_champion(registry, tables, ray_local, monkeypatch, capsys):
    import mlflow

    root, q, db, db_ids, gnd = tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    args = [
        "rerank",
        str(root / "q.parquet"),
        str(root / "db.parquet"),
        "--model",
        "models:/ssr-retrieval-cli@champion",
        "--out",
        str(root / "out"),
        "--gnd",
        str(root / "gnd.json"),
        "--actors",
        "1",
        "--shard-size",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    topk, reranked = SimilarityStore(root / "out" / "topk"), SimilarityStore(root / "out" / "reranked")
    assert topk.is_complete() and reranked.is_complete() and reranked.k == K and reranked.n_queries == N_Q
    # the re-ranked lists are the registered model's own order of each top-K
    model = mlflow.pytorch.load_model("models:/ssr-retrieval-cli@champion", map_location="cpu")
    initial = np.argsort(-(_unit(q) @ _unit(db).T), axis=1)[:, :K]  # rows, best first
    want = model.rerank(
        torch.from_numpy(_unit(q)), torch.from_numpy(_unit(db)[initial]), torch.from_numpy(db_ids[initial])
    )[0]
    got = {int(i): row for s in reranked.iter_shards() for i, row in zip(s.query_ids, s.neighbor_ids)}
    for r in range(N_Q):
        assert np.array_equal(got[500 + r], want[r].numpy())
    # mAP before and after, printed from the same lists
    row_of = {int(i): r for r, i in enumerate(db_ids)}
    after = np.asarray([[row_of[int(i)] for i in got[500 + r]] for r in range(N_Q)])
    for label, ranks in (("before", initial), ("after", after)):
        res = revisited_map(ranks, gnd)
        assert f"{label:<9} {res['easy']['map']:7.2f} {res['medium']['map']:7.2f} {res['hard']['map']:7.2f}" in out
    # a second run reuses the complete top-K store
    stamp = (root / "out" / "topk" / "_manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (root / "out" / "topk" / "_manifest.json").stat().st_mtime_ns == stamp


def test_rerank_bad_input_one_line_exit_2_nothing_written(registry, tables, ray_local, monkeypatch, capsys):
    root, q, db, db_ids, gnd = tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    base = ["--model", "models:/ssr-retrieval-cli@champion", "--out", str(root / "bad")]
    write_features(
        root / "q10.parquet", ids=np.arange(N_Q), labels=[0] * N_Q, splits="query", embeddings=q[:, :10], metadata=META
    )
    wide = [
        {"easy": np.array([N_DB]), "hard": np.array([], np.int64), "junk": np.array([], np.int64), "bbx": None}
    ] * N_Q
    write_gnd_json(root / "wide.json", RevisitedGroundTruth([], [str(i) for i in range(N_Q)], wide))
    cases = [
        (
            ["--k", "7"],
            "q.parquet",
            r"--k 7: the model models:/ssr-retrieval-cli@champion re-ranks exactly k=5 neighbours",
        ),
        ([], "q10.parquet", r"db.parquet: embedding has dim 12, but q10.parquet has dim 10"),
        (
            ["--gnd", str(root / "wide.json")],
            "q.parquet",
            rf"wide.json: query 0: field 'easy' has index {N_DB} outside [0, {N_DB})",
        ),
        (
            ["--model", "models:/no-such-model@champion"],
            "q.parquet",
            "model models:/no-such-model@champion: cannot be loaded",
        ),
    ]
    for extra, queries, message in cases:
        assert main(["rerank", str(root / queries), str(root / "db.parquet"), *base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (root / "bad").exists()
