"""Your own data, end to end: data the test makes itself (no glyphs, no glyph features), the
real `ssr` flow under the shared Prefect harness, real Ray and a real MLflow SQLite store.

- few-shot on a pandas-written embeddings table (list<double> rows, string labels, no
  project metadata), one test class too small for an episode;
- retrieval on a labelled embeddings folder without a ground-truth file (label matches): the
  whole flow, then `ssr rerank --gnd labels` with the model the run registered; the same
  folder with gnd.pkl (revisitop format) through the flow's import and the report's scoring
  only (the whole flow on revisitop pickles is test_flow_landmarks).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssr_tasks.config import FewShotParams, RetrievalParams

D = 24  # unlike the glyphs' 256
ROOT = Path(__file__).resolve().parents[2]


def clustered(rng, n_classes: int, per_class: int, noise: float, centres=None):
    """(embeddings (n, D) float64 with norms ~20, class index per row, centres)."""
    centres = rng.standard_normal((n_classes, D)) if centres is None else centres
    labels = np.repeat(np.arange(n_classes), per_class)
    emb = centres[labels] + noise * rng.standard_normal((len(labels), D))
    return 20 * emb / np.linalg.norm(emb, axis=1, keepdims=True), labels, centres


@pytest.fixture(scope="module")
def fewshot_table(tmp_path_factory):
    rng = np.random.default_rng(3)
    rows = []
    for split, n_classes in (("train", 8), ("val", 5), ("test", 6)):
        emb, labels, _ = clustered(rng, n_classes, 12, 1.1)
        for e, c in zip(emb, labels):
            rows.append({"split": split, "label": f"{split}-class-{c}", "embedding": e})
    tiny, _, _ = clustered(rng, 1, 3, 1.1)  # 3 items: fewer than n_shot + n_query
    rows += [{"split": "test", "label": "test-tiny", "embedding": e} for e in tiny]
    df = pd.DataFrame(rows)
    df.insert(0, "id", np.arange(len(df)) * 7 + 100)
    df = df.sample(frac=1.0, random_state=0)  # rows shuffled: splits and classes interleaved, ids out of order
    path = tmp_path_factory.mktemp("own-fewshot") / "embeddings.parquet"
    df.to_parquet(path)  # pandas: embedding as list<double>
    return path


OWN_FEWSHOT = dict(
    train=dict(n_way=3, n_query=4, max_steps=2, hidden=16, iterations_first=6, iterations_next=4, val_every=3),
    sweep=dict(lr_dni=[0.1]),
    evaluation=dict(
        eval_shots=[1, 2],
        n_val_episodes=6,
        n_test_episodes=10,
        methods=["baseline", "k-reciprocal", "ssr", "simpleshot"],
    ),
    baselines=dict(krecip_k1=[3], krecip_k2=[2], krecip_lambda=[0.3]),
    model_name="ssr-own-fewshot",
    device="cpu",
)


@pytest.mark.slow
def test_fewshot_on_a_pandas_embeddings_table(ssr_home, ray_local, prefect_harness, fewshot_table):
    from flows.ssr_flow import ssr

    params = FewShotParams(data=dict(dataset="features", data_root=str(fewshot_table)), from_data=True, **OWN_FEWSHOT)
    result = ssr(pipeline="fewshot", fewshot=params)
    methods = [r["method"].split()[0] for r in result["results"]]
    assert methods == ["Baseline", "k-reciprocal", "SSR", "SimpleShot"]
    assert result["model_uri"].startswith("models:/ssr-own-fewshot/")

    import mlflow

    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result["run_id"])
    assert run.data.metrics["classes_left_out_test"] == 1 and run.data.metrics["classes_left_out_train"] == 0
    # from_data: lr_dni 0.1 per unit norm, times the mean squared norm of the features (20^2)
    trials = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert [t.data.tags["ssr.trial"] for t in trials] == ["lr_dni=40"]
    version = client.get_model_version("ssr-own-fewshot", str(result["version"]))
    assert version.tags["backbone"] == "none" and version.tags["feat_dim"] == str(D)
    from ssr_tasks.registry import load_registered_model

    model = load_registered_model(result["model_uri"], uri)
    assert model.backbone is None and model.ssr.feat_dim == D


def retrieval_folder(root, with_gnd: bool):
    """train.parquet (60 classes x 8), queries (12) and database (20 classes x 6) of unseen
    classes; gnd.pkl in the revisitop format (easy = same class, first item of a class junk)."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    emb, labels, _ = clustered(rng, 60, 8, 0.9)
    pd.DataFrame({"id": np.arange(len(emb)), "label": labels, "embedding": list(emb.astype(np.float32))}).to_parquet(
        root / "train.parquet"
    )
    db, db_labels, centres = clustered(rng, 20, 6, 0.9)
    qs, q_labels, _ = clustered(rng, 20, 1, 0.9, centres)
    qs, q_labels = qs[:12], q_labels[:12]
    db_frame = pd.DataFrame({"id": np.arange(len(db)) + 1000, "label": db_labels, "embedding": list(db)})
    q_frame = pd.DataFrame({"id": np.arange(len(qs)) + 5000, "label": q_labels, "embedding": list(qs)})
    if not with_gnd:  # rows that carry image paths (relative to the folder) get the re-ranked example figure
        from PIL import Image

        (root / "img").mkdir()
        for frame, prefix in ((db_frame, "db"), (q_frame, "q")):
            frame["path"] = [f"img/{prefix}{i}.png" for i in range(len(frame))]
            for rel, c in zip(frame["path"], frame["label"]):
                Image.fromarray(np.full((8, 8, 3), 10 * int(c), np.uint8)).save(root / rel)
    db_frame.to_parquet(root / "database.parquet")
    q_frame.to_parquet(root / "queries.parquet")
    if with_gnd:
        gnd = []
        for c in q_labels:
            same = np.flatnonzero(db_labels == c)
            gnd.append({"easy": same[1:].tolist(), "hard": [], "junk": same[:1].tolist()})
        with open(root / "gnd.pkl", "wb") as f:
            pickle.dump(
                {"imlist": [str(i) for i in range(len(db))], "qimlist": [str(i) for i in range(len(qs))], "gnd": gnd}, f
            )
    return root


OWN_RETRIEVAL = dict(
    data=dict(dataset="features", holdout_fraction=0.3),
    train=dict(
        k=10,
        hidden=16,
        sequence_length=100,
        min_positives=1,
        iterations=6,
        val_every=3,
        batch_queries=4,
        n_val_queries=10,
    ),
    sweep=dict(lr_dni=[1e-2]),
    baselines=dict(qe_n_grid=[1, 2], krecip_pairs=[(10, 5)], krecip_lambda=[0.3]),
    evaluation=dict(shard_size=8, n_rerank_actors=1),
    device="cpu",
    from_data=True,
)


def own_retrieval_params(root: Path, name: str) -> RetrievalParams:
    return RetrievalParams(
        **{**OWN_RETRIEVAL, "data": {**OWN_RETRIEVAL["data"], "data_root": str(root)}, "model_name": name}
    )


def test_retrieval_folder_with_gnd_pkl_through_the_flows_import(tmp_path):
    """gnd.pkl (revisitop format) goes through the flow's own import (the body of its
    prepare-retrieval-data task, after the from_data holdout sizing): the ground truth it keeps
    is the file's, row for row, and the report's scoring of it has Easy / Medium / Hard. The
    whole flow on a labelled folder is the next test; label matches are its ground truth."""
    from ssr_tasks.retrieval.evaluate import map_row
    from ssr_tasks.retrieval.report import labels_only
    from ssr_tasks.retrieval.tasks import data_for_run, prepare_data
    from storage.features import read_features
    from storage.landmarks import read_gnd
    from tests.flows.test_flow_landmarks import revisitop_map

    root = retrieval_folder(tmp_path / "own", with_gnd=True)
    params = own_retrieval_params(root, "ssr-own-retrieval-gnd")
    data_params = data_for_run(params)
    assert data_params.holdout_fraction != OWN_RETRIEVAL["data"]["holdout_fraction"]  # sized from the data
    data = prepare_data.fn(data_params, str(tmp_path / "run"))
    assert data.images is None  # no path column: the report draws no re-ranked example
    gt = read_gnd(data.gnd)
    with open(root / "gnd.pkl", "rb") as f:
        given = pickle.load(f)["gnd"]
    assert [{key: g[key].tolist() for key in ("easy", "hard", "junk")} for g in gt.gnd] == given
    assert not labels_only(gt.gnd)  # the table keeps the revisited columns

    queries, database = read_features(data.queries), read_features(data.database)
    want_q, want_db = pd.read_parquet(root / "queries.parquet"), pd.read_parquet(root / "database.parquet")
    q_emb, db_emb = np.asarray(queries.embeddings), np.asarray(database.embeddings)
    # rows kept in the file's order: the ground truth's database indices still point at them
    np.testing.assert_allclose(q_emb, np.stack(want_q["embedding"]), rtol=1e-6)
    np.testing.assert_allclose(db_emb, np.stack(want_db["embedding"]), rtol=1e-6)
    ranks = np.argsort(-(q_emb @ db_emb.T), axis=1, kind="stable")  # (Q, N), the features row's ranking
    row = map_row("features", ranks, gt.gnd)
    raw = [{key: np.asarray(g[key]) for key in ("easy", "hard", "junk")} for g in given]
    for protocol in ("easy", "medium"):
        want = revisitop_map(np.stack(want_q["embedding"]).T, np.stack(want_db["embedding"]).T, raw, protocol)
        assert row[f"mAP {protocol}"] == pytest.approx(round(want, 2), abs=0.011)
    assert "mAP hard" in row  # no hard items in this file: the column is there, its value is the protocol's


@pytest.mark.slow
def test_retrieval_on_labelled_embeddings_then_rerank(ssr_home, ray_local, prefect_harness, tmp_path):
    from flows.ssr_flow import ssr

    root = retrieval_folder(tmp_path / "own", with_gnd=False)
    name = "ssr-own-retrieval-labels"
    result = ssr(pipeline="retrieval", retrieval=own_retrieval_params(root, name))
    rows = result["results"]
    assert [r["method"] for r in rows][:2] == ["features", "features + SSR"]
    assert [r["method"] for r in rows][::2] == list(RetrievalParams().baselines.methods)  # every method, + SSR
    # label matches: one mAP, one mP@10, and the table says why
    assert "mAP" in rows[0] and "mAP hard" not in result["markdown"]
    assert "label matches" in result["markdown"]
    assert result["model_uri"].startswith(f"models:/{name}/")
    import mlflow

    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result["run_id"])
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    grid = sorted(float(t.data.tags["ssr.trial"].removeprefix("lr_dni=")) for t in nested)
    assert len(grid) == 3 and grid[2] / grid[0] == pytest.approx(10, rel=0.05)  # from_data: lr* x (0.3, 1, 3)
    assert float(run.data.params["chosen.lr_dni"]) in grid
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert "plots/reranked_example.png" in plots  # the rows carry image paths

    # the model the run registered re-ranks new tables of the same D, scored by their labels
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ssr_home / 'mlflow.db'}", "SSR_HOME": str(ssr_home)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "rerank",
            str(root / "queries.parquet"),
            str(root / "database.parquet"),
            "--model",
            result["model_uri"],
            "--out",
            str(tmp_path / "rr"),
            "--gnd",
            "labels",
            "--actors",
            "1",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mAP" in out and "mP@10" in out and "before" in out and "after" in out and "label matches" in out

    # a table of another D is refused in one line naming both dimensions and the model
    other = tmp_path / "other.parquet"
    pd.DataFrame({"id": [0, 1], "embedding": list(np.ones((2, D + 8)))}).to_parquet(other)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "rerank",
            str(other),
            str(other),
            "--model",
            result["model_uri"],
            "--out",
            str(tmp_path / "rr2"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert f"dim {D + 8}, but the model {result['model_uri']} was trained on dim {D}" in proc.stderr


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """{train,val,test}/<class>/<image>: PNG, JPEG, RGBA, grayscale and palette images of
    several sizes; a class is a colour and a stripe orientation."""
    from PIL import Image

    root = tmp_path_factory.mktemp("own-images")
    rng = np.random.default_rng(9)
    for split, n_classes in (("train", 5), ("val", 3), ("test", 3)):
        for c in range(n_classes):
            folder = root / split / f"{split}-{c}"
            folder.mkdir(parents=True)
            colour = rng.integers(0, 255, 3)
            for i in range(6):
                h, w = 20 + 3 * i, 24 + 2 * (i % 3)
                img = np.clip(colour + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                img[:: 4 if c % 2 else 1, :: 1 if c % 2 else 4] = 255
                pil = Image.fromarray(img)
                kind = i % 4
                if kind == 0:
                    pil.save(folder / f"{i}.png")
                elif kind == 1:
                    pil.save(folder / f"{i}.jpg", quality=90)
                elif kind == 2:
                    pil.convert("RGBA").save(folder / f"{i}.png")
                else:
                    pil.convert("L").save(folder / f"{i}.png")
            pil.convert("P").save(folder / "palette.gif")
    return root


@pytest.mark.slow
def test_fewshot_on_an_image_folder_of_mixed_images(ssr_home, ray_local, prefect_harness, image_folder):
    from flows.ssr_flow import ssr

    params = FewShotParams(
        data=dict(dataset="image-folder", data_root=str(image_folder), image_size=16),
        backbone=dict(pretrain_epochs=1, pretrain_batch_size=8),
        **{**OWN_FEWSHOT, "model_name": "ssr-own-images"},
    )
    result = ssr(pipeline="fewshot", fewshot=params)
    assert [r["method"].split()[0] for r in result["results"]] == ["Baseline", "k-reciprocal", "SSR", "SimpleShot"]

    import mlflow

    uri = f"sqlite:///{ssr_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    params_logged = client.get_run(result["run_id"]).data.params
    assert params_logged["data.normalization"] == "auto" and "data.mean" in params_logged  # auto stats recorded
    mean = [float(x) for x in params_logged["data.mean"].strip("[]").split(",")]
    assert len(mean) == 3 and all(0.0 < m < 1.0 for m in mean)


@pytest.mark.slow
def test_a_sweep_over_n_shot_trains_one_model_per_test_column(ssr_home, ray_local, prefect_harness, fewshot_table):
    from flows.ssr_flow import ssr

    params = FewShotParams(
        data=dict(dataset="features", data_root=str(fewshot_table)),
        **{**OWN_FEWSHOT, "sweep": {"n_shot": [1, 2], "lr_dni": [0.1]}, "model_name": "ssr-own-shots"},
    )
    result = ssr(pipeline="fewshot", fewshot=params)
    assert "SSR per column: 1-shot: trained at 1 shots (lr_dni=0.1,n_shot=1" in result["markdown"]
    assert "2-shot: trained at 2 shots (lr_dni=0.1,n_shot=2" in result["markdown"]


def test_n_way_and_n_query_cannot_be_swept():
    with pytest.raises(ValueError, match="sweep: 'n_query' is not a field of the train group that can be swept"):
        FewShotParams(sweep={"n_query": [5, 10]})
    assert FewShotParams(sweep={"n_shot": [1, 5]}).sweep == {"n_shot": [1, 5]}
