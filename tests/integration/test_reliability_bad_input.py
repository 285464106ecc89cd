"""Bad input through the pipeline's entry points: each error names the file, the field and
what was expected; CLI paths exit non-zero; nothing is written under a final name.

The storage readers' own checks are tested in tests/storage; here they are reached the way
a run reaches them (episode loading, the re-ranking worker and actor pool, the few-shot
evaluator, the backbone loader, the ``ssr`` command line and the flow's parameter form).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ssr_model.backbones import build_backbone
from ssr_tasks.backbone import load_backbone
from ssr_tasks.config import FewShotTrainParams, RetrievalTrainParams
from ssr_tasks.fewshot.episodes import fixed_episodes, load_split, sample_episodes
from ssr_tasks.fewshot.evaluate import FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotModel
from ssr_tasks.retrieval.handoffs import RetrievalModel
from ssr_tasks.retrieval.rerank import ShardReranker, rerank_store
from storage.features import write_features
from storage.simstore import SimilarityStore, build_topk_store, create_store

SSR = str(Path(sys.executable).parent / "ssr")
META = {b"dataset": b"t", b"backbone": b"t", b"checkpoint_hash": b"-"}


def raw_features(path: Path, ids, labels, splits, emb, paths=None) -> Path:
    """A features table written with pyarrow directly, bypassing the writer's checks (as a foreign tool might)."""
    emb = np.asarray(emb, np.float32)
    cols = {
        "id": pa.array(ids, pa.int64()),
        "label": pa.array(labels, pa.string()),
        "split": pa.array(splits, pa.string()),
    }
    if paths is not None:
        cols["path"] = pa.array(paths, pa.string())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    pq.write_table(pa.table(cols).replace_schema_metadata({**META, b"dim": str(emb.shape[1]).encode()}), path)
    return path


def good_rows(n=12, dim=4):
    rng = np.random.default_rng(0)
    return (list(range(n)), [f"c{i % 3}" for i in range(n)], ["val"] * n, rng.normal(size=(n, dim)))


# ---- features tables ---------------------------------------------------------------------------


def test_nan_features_are_refused_naming_file_and_id(tmp_path):
    ids, labels, splits, emb = good_rows()
    emb[5, 1] = np.nan
    path = raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb)
    with pytest.raises(ValueError, match=r"feat\.parquet: embedding of id 5 has NaN or inf values"):
        load_split(path, "val")
    emb[5, 1] = np.inf
    with pytest.raises(ValueError, match=r"feat\.parquet: embedding of id 5 has NaN or inf"):
        load_split(raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb), "val")


def test_duplicate_ids_are_refused(tmp_path):
    ids, labels, splits, emb = good_rows()
    ids[7] = 2
    with pytest.raises(ValueError, match=r"feat\.parquet: id 2 is duplicated; ids must be unique"):
        load_split(raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb), "val")


def test_missing_labels_are_refused(tmp_path):
    ids, labels, splits, emb = good_rows()
    labels[4] = None
    with pytest.raises(ValueError, match=r"feat\.parquet: label is missing for id 4"):
        load_split(raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb), "val")


def test_empty_split_is_refused(tmp_path):
    path = raw_features(tmp_path / "feat.parquet", *good_rows())
    with pytest.raises(ValueError, match=r"feat\.parquet: no rows with split 'test' \(found \['val'\]\)"):
        load_split(path, "test")


def test_class_with_too_few_images_names_the_file_split_and_need(tmp_path):
    ids, labels, splits, emb = good_rows(n=12)  # 3 classes x 4 images
    val = load_split(raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb), "val")
    with pytest.raises(
        ValueError,
        match=r"feat\.parquet, split 'val': split has 0 classes with >= 6 images "
        r"\(n_shot 1 \+ n_query 5\), need n_way=3",
    ):
        sample_episodes(val, 2, 3, 1, 5, seed=0)


def test_truncated_parquet_is_a_corrupt_file_error(tmp_path):
    path = raw_features(tmp_path / "feat.parquet", *good_rows())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"feat\.parquet: not a readable Parquet file \(truncated or wrong format"):
        load_split(path, "val")


def test_features_of_the_wrong_dimension_for_the_model(tmp_path):
    ids, labels, splits, emb = good_rows(dim=4)
    path = raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb)
    cfg = FewShotTrainParams(n_way=3, n_query=2, hidden=8)
    torch.save(cfg.build(6, 1).state_dict(), tmp_path / "ssr.pt")
    with pytest.raises(ValueError, match=r"feat\.parquet: embedding has dim 4, expected 6"):
        FewShotEvaluator(str(path), "val", FewShotModel(str(tmp_path / "ssr.pt"), cfg, 6, 1))


# ---- episode files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (
            [{"Support": [["c0/0.png"], ["c1/1.png"]], "Query": [["c0/3.png"], ["c9/404.png"]]}],
            r"eps\.json: episode 0: Query image 'c9/404\.png' not found in .*feat\.parquet, split 'val'",
        ),
        ([{"Support": [["c0/0.png"]]}], r"eps\.json: episode 0: 'Query' must be a non-empty list of non-empty lists"),
        (["c0/0.png"], r"eps\.json: episode 0: expected an object with 'Support' and 'Query'"),
        ({"Support": []}, r"eps\.json: expected a non-empty JSON list of episodes, got dict"),
        ("{not json", r"eps\.json: not valid JSON"),
        (
            [
                {"Support": [["c0/0.png"], ["c1/1.png"]], "Query": [["c0/3.png"], ["c1/4.png"]]},
                {
                    "Support": [["c0/0.png", "c0/3.png"], ["c1/1.png", "c1/4.png"]],
                    "Query": [["c0/6.png"], ["c1/7.png"]],
                },
            ],
            r"eps\.json: episode 1 is 2-way 2-shot 1-query, episode 0 2-way 1-shot 1-query \(expected the same n_way",
        ),
    ],
)
def test_bad_episode_json(tmp_path, content, message):
    ids, labels, splits, emb = good_rows()
    paths = [f"{lab}/{i}.png" for i, lab in zip(ids, labels)]
    val = load_split(raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb, paths), "val")
    (tmp_path / "eps.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        fixed_episodes(val, tmp_path / "eps.json")


def test_episode_json_needs_the_path_column(tmp_path):
    val = load_split(raw_features(tmp_path / "feat.parquet", *good_rows()), "val")
    (tmp_path / "eps.json").write_text(json.dumps([{"Support": [["c0/0.png"]], "Query": [["c0/3.png"]]}]))
    with pytest.raises(ValueError, match=r"eps\.json: the features table has no 'path' column to match episodes"):
        fixed_episodes(val, tmp_path / "eps.json")


# ---- checkpoints -------------------------------------------------------------------------------


def test_backbone_checkpoint_of_another_architecture(tmp_path):
    torch.save(build_backbone("resnet12", 32, in_channels=3).state_dict(), tmp_path / "resnet12.pt")
    with pytest.raises(ValueError, match=r"resnet12\.pt: not a conv4-64 state dict for glyphs"):
        load_backbone("conv4-64", "glyphs", tmp_path / "resnet12.pt")


def test_checkpoint_pickle_with_foreign_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(ValueError, match=r"evil\.pt: "):
        load_backbone("conv4-64", "glyphs", tmp_path / "evil.pt")


# ---- re-ranking inputs -------------------------------------------------------------------------

D, N_DB, N_Q = 8, 40, 10


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-rerank")
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(N_DB, D)).astype(np.float32), rng.normal(size=(N_Q, D)).astype(np.float32)
    meta = {"dataset": "t", "backbone": "t", "checkpoint_hash": "-"}
    write_features(
        root / "db.parquet", ids=np.arange(N_DB), labels=[0] * N_DB, splits="database", embeddings=db, metadata=meta
    )
    write_features(
        root / "q.parquet", ids=np.arange(N_Q), labels=[0] * N_Q, splits="query", embeddings=q, metadata=meta
    )
    build_topk_store(q, np.arange(N_Q), db, np.arange(N_DB), root / "topk", 10, shard_size=4)
    cfg = RetrievalTrainParams(k=6, steps=1, lr_dni=0.5, hidden=16)
    torch.save(cfg.build(D).state_dict(), root / "model.pt")
    return root, RetrievalModel(str(root / "model.pt"), cfg, D)


def test_reranker_checkpoint_of_another_hidden_size(store, tmp_path):
    root, model = store
    torch.save(model.config.model_copy(update={"hidden": 32}).build(D).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(
        ValueError, match=r"wide\.pt: \S+ has shape \(\d*, ?\d*\)?.*RetrievalSSR\(.*hidden=16\) expects"
    ):
        ShardReranker(str(root / "db.parquet"), replace(model, weights=str(tmp_path / "wide.pt")))


def test_fewshot_checkpoint_of_another_model_kind(store, tmp_path):
    root, model = store  # a retrieval SSR state dict given to the few-shot evaluator
    ids, labels, splits, emb = good_rows(dim=D)
    path = raw_features(tmp_path / "feat.parquet", ids, labels, splits, emb)
    cfg = FewShotTrainParams(n_way=3, n_query=2, hidden=16)
    with pytest.raises(ValueError, match=r"model\.pt: (not a state dict of FewShotSSR|\S+ has shape .* FewShotSSR)"):
        FewShotEvaluator(str(path), "val", FewShotModel(model.weights, cfg, D, 1))


def test_reranker_refuses_database_of_the_wrong_dimension(store):
    root, model = store
    with pytest.raises(ValueError, match=rf"db\.parquet: embedding has dim {D}, expected {D + 4}"):
        ShardReranker(str(root / "db.parquet"), replace(model, feat_dim=D + 4))


def test_truncated_database_parquet(store, tmp_path):
    root, model = store
    data = (root / "db.parquet").read_bytes()
    (tmp_path / "db.parquet").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"db\.parquet: not a readable Parquet file"):
        ShardReranker(str(tmp_path / "db.parquet"), model)


def test_store_whose_shards_disagree_on_k_fails_the_actor_pool_run(store, tmp_path, ray_local):
    import shutil

    root, model = store
    bad = tmp_path / "topk"
    shutil.copytree(root / "topk", bad)
    part = SimilarityStore(bad).read_shard(1)
    n = len(part)
    offsets = pa.array(np.arange(0, n * 5 + 1, 5, dtype=np.int32))
    pq.write_table(
        pa.table(
            {  # K=5 in a store whose manifest says K=10
                "query_id": pa.array(part.query_ids),
                "neighbor_ids": pa.ListArray.from_arrays(offsets, pa.array(part.neighbor_ids[:, :5].reshape(-1))),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(part.scores[:, :5].reshape(-1))),
            }
        ),
        bad / "part-00001.parquet",
    )
    with pytest.raises(Exception, match=r"part-00001\.parquet: neighbor_ids row 0 has length 5, manifest K is 10"):
        rerank_store(bad, root / "q.parquet", root / "db.parquet", tmp_path / "out", model, n_actors=1)
    assert not (tmp_path / "out" / "part-00001.parquet").exists()
    assert 1 in SimilarityStore(tmp_path / "out").pending_shards()


def test_query_without_features_names_the_query_table(store, tmp_path):
    root, model = store
    q = np.ones((N_Q - 1, D), np.float32)  # the last query is missing
    write_features(
        tmp_path / "q.parquet",
        ids=np.arange(N_Q - 1),
        labels=[0] * (N_Q - 1),
        splits="query",
        embeddings=q,
        metadata={"dataset": "t", "backbone": "t", "checkpoint_hash": "-"},
    )
    create_store(tmp_path / "out", 10, N_Q, 3, 4)
    worker = ShardReranker(str(root / "db.parquet"), model)
    with pytest.raises(ValueError, match=rf"q\.parquet: query id {N_Q - 1} of shard 2 has no features"):
        worker.rerank_shard(str(root / "topk"), str(tmp_path / "q.parquet"), str(tmp_path / "out"), 2)
    assert not (tmp_path / "out" / "part-00002.parquet").exists()


# ---- revisited ground truth and pickles through `ssr data import-landmarks` --------------------


def _landmarks(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    with open(tmp_path / "landmarks.pkl", "wb") as fh:
        pickle.dump(
            {"X": rng.normal(size=(6, 4)).astype(np.float32), "Q": rng.normal(size=(2, 4)).astype(np.float32)}, fh
        )
    return tmp_path / "landmarks.pkl"


def _gnd(**change):
    g = {
        "imlist": [f"i{i}" for i in range(6)],
        "qimlist": ["q0", "q1"],
        "gnd": [{"easy": [0], "hard": [1], "junk": []}, {"easy": [2], "hard": [], "junk": [3]}],
    }
    return {**g, **change}


@pytest.mark.parametrize(
    "gnd, message",
    [
        (
            _gnd(gnd=[{"easy": [0], "hard": [99], "junk": []}, {"easy": [2], "hard": [], "junk": [3]}]),
            r"gnd\.pkl: query 0: field 'hard' has index 99 outside \[0, 6\)",
        ),
        (
            _gnd(gnd=[{"easy": [0], "hard": [1]}, {"easy": [2], "hard": [], "junk": [3]}]),
            r"gnd\.pkl: query 0: missing field 'junk'",
        ),
        ({"imlist": ["i0"], "gnd": []}, r"gnd\.pkl: missing key 'qimlist'"),
    ],
)
def test_malformed_ground_truth_through_the_cli(tmp_path, capsys, gnd, message):
    from flows.cli import main

    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump(gnd, fh)
    code = main(
        [
            "data",
            "import-landmarks",
            str(_landmarks(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--gnd",
            str(tmp_path / "gnd.pkl"),
        ]
    )
    assert code != 0
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pickle_with_foreign_globals_through_the_cli(tmp_path, capsys):
    from flows.cli import main

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": Evil()}, fh)
    code = main(
        [
            "data",
            "import-landmarks",
            str(_landmarks(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--gnd",
            str(tmp_path / "gnd.pkl"),
        ]
    )
    assert code != 0
    assert "gnd.pkl: pickle references forbidden global" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# ---- parameters out of range -------------------------------------------------------------------


def test_out_of_range_retrieval_parameters_are_refused_by_the_cli(tmp_path):
    sets = ["train.steps=0", "train.lr=-1", "train.k=1", "train.iterations=0"]
    out = subprocess.run(
        [SSR, "run", "retrieval", *(a for s in sets for a in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=180,
        env={**__import__("os").environ, "SSR_HOME": str(tmp_path / "h")},
    )
    assert out.returncode == 2
    for field in ("steps", "lr", "k", "iterations"):
        assert f"ssr run: parameter train.{field}:" in out.stderr
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(
    "group, values, field",
    [
        ("fewshot", {"train": {"n_way": 1}}, "n_way"),
        ("fewshot", {"train": {"max_steps": 0}}, "max_steps"),
        ("fewshot", {"sweep": {"lr_dni": [-1e-3]}}, "lr_dni"),
        ("fewshot", {"train": {"n_query": 0}}, "n_query"),
        ("fewshot", {"sweep": {"hiden": [8]}}, "hiden"),
        ("retrieval", {"train": {"steps": 0}}, "steps"),
        ("retrieval", {"train": {"lr": -0.1}}, "lr"),
        ("retrieval", {"train": {"k": 1}}, "k"),
        ("retrieval", {"sweep": {"k": [1]}}, "k"),
    ],
)
def test_flow_form_refuses_out_of_range_values(group, values, field):
    from prefect.exceptions import ParameterTypeError

    from flows.ssr_flow import ssr

    with pytest.raises(ParameterTypeError, match=field):
        ssr.validate_parameters({"pipeline": group, group: values})


# ---- your own data through `ssr run` (issue 19): one line naming file and field, exit 2, nothing written ----


def _own_fewshot_frame(n_classes=(4, 3, 3), per_class=6, dim=5, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = [
        {"split": s, "label": f"{s}{c}", "embedding": rng.standard_normal(dim)}
        for s, n in zip(("train", "val", "test"), n_classes)
        for c in range(n)
        for _ in range(per_class)
    ]
    df = pd.DataFrame(rows)
    df.insert(0, "id", np.arange(len(df)))
    return df


def _run_own(kind: str, root: Path, home: Path, *sets: str) -> subprocess.CompletedProcess:
    preset = "own-fewshot" if kind == "fewshot" else "own-retrieval"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["SSR_HOME"] = str(home)
    cmd = (
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            kind,
            "--preset",
            preset,
            "--set",
            f"data.data_root={root}",
            "--set",
            "train.n_way=3",
            *[a for s in sets for a in ("--set", s)],
        ]
        if kind == "fewshot"
        else [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            kind,
            "--preset",
            preset,
            "--set",
            f"data.data_root={root}",
            *[a for s in sets for a in ("--set", s)],
        ]
    )
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2]
    )


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("no-label", r"missing column 'label'"),
        ("no-split", r"missing column 'split'"),
        ("mixed-length", r"embedding: row id \d+ has length"),
        ("nan", r"embedding of id \d+ has NaN or inf"),
        ("duplicate-ids", r"id \d+ is duplicated"),
        ("too-few-classes", r"split 'test' has 2 classes with >= \d+ items, n_way is 3"),
    ],
)
def test_own_fewshot_table_bad_input_exits_2_in_one_line(tmp_path, bad, expected):
    df = _own_fewshot_frame(n_classes=(4, 3, 2) if bad == "too-few-classes" else (4, 3, 3))
    if bad == "no-label":
        df = df.drop(columns="label")
    elif bad == "no-split":
        df = df.drop(columns="split")
    elif bad == "mixed-length":
        df.at[7, "embedding"] = np.ones(3)
    elif bad == "nan":
        df.at[9, "embedding"] = np.full(5, np.nan)
    elif bad == "duplicate-ids":
        df.loc[3, "id"] = 2
    table = tmp_path / "own.parquet"
    df.to_parquet(table)
    home = tmp_path / "home"
    out = _run_own("fewshot", table, home, "train.n_query=2", "evaluation.eval_shots=[1]")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("ssr run:")]
    assert len(lines) == 1 and "own.parquet" in lines[0]
    assert __import__("re").search(expected, lines[0]), lines[0]
    imports = home / "data" / "features"
    left = sorted(p.name for p in imports.iterdir()) if imports.exists() else []
    assert not [n for n in left if n.startswith(".") or n.endswith(".tmp")]  # nothing half-written
    if bad != "too-few-classes":  # a valid table stays imported; a refused one leaves nothing
        assert left == []


def test_own_image_folder_with_an_unreadable_image_is_named(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(3):
            folder = tmp_path / "imgs" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "test" / "c1" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = _run_own("fewshot", tmp_path / "imgs", tmp_path / "home", "data.dataset=image-folder")
    assert out.returncode == 2, out.stderr
    assert "broken.jpg" in out.stderr and "not a readable image" in out.stderr


def test_own_retrieval_held_out_set_too_small_for_k_exits_2_before_training(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(1)
    root = tmp_path / "own"
    root.mkdir()
    labels = np.repeat(np.arange(20), 4)
    pd.DataFrame({"id": np.arange(80), "label": labels, "embedding": list(rng.standard_normal((80, 6)))}).to_parquet(
        root / "train.parquet"
    )
    for name, n in (("queries", 5), ("database", 30)):
        pd.DataFrame(
            {"id": np.arange(n), "label": np.arange(n) % 5, "embedding": list(rng.standard_normal((n, 6)))}
        ).to_parquet(root / f"{name}.parquet")
    out = _run_own("retrieval", root, tmp_path / "home", "train.k=50")
    assert out.returncode == 2, out.stderr
    assert "fewer than k=50" in out.stderr and "holdout_fraction" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "home" / "retrieval").exists()


def test_own_retrieval_dims_differ_are_named(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(2)
    root = tmp_path / "own"
    root.mkdir()
    pd.DataFrame(
        {"id": np.arange(40), "label": np.repeat(np.arange(10), 4), "embedding": list(rng.standard_normal((40, 6)))}
    ).to_parquet(root / "train.parquet")
    pd.DataFrame({"id": [0, 1], "label": [0, 1], "embedding": list(rng.standard_normal((2, 6)))}).to_parquet(
        root / "queries.parquet"
    )
    pd.DataFrame({"id": [0, 1], "label": [0, 1], "embedding": list(rng.standard_normal((2, 9)))}).to_parquet(
        root / "database.parquet"
    )
    out = _run_own("retrieval", root, tmp_path / "home")
    assert out.returncode == 2, out.stderr
    assert "database.parquet" in out.stderr and "D=9" in out.stderr
