import argparse
import subprocess
import sys

from storage.cli import main, register


def test_prepare_renders_the_builtin_dataset(tmp_path, capsys):
    assert main(["data", "prepare", "glyphs", "--root", str(tmp_path), "--seed", "3", "--size", "small"]) == 0
    out = capsys.readouterr().out
    assert '"size": "small"' in out and '"seed": 3' in out
    assert (tmp_path / "glyphs" / "train").is_dir() and (tmp_path / "glyphs" / "dataset.json").exists()
    assert (tmp_path / "glyphs-retrieval" / "test" / "gnd_glyphs-retrieval.pkl").exists()


def test_prepare_reports_an_unwritable_root_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["data", "prepare", "glyphs", "--root", str(blocker / "data"), "--size", "small"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and err.count("\n") == 1


def test_register_into_an_outer_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="ssr")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["data", "import-landmarks", "x.pkl", "--out", str(tmp_path)])
    assert args.command == "data" and args.data_command == "import-landmarks" and callable(args.handler)
    assert args.handler(args) == 2  # x.pkl does not exist: one-line error, no traceback


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "storage.cli", "data", "download", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "cifar-100" in out.stdout


def _features(path, x, split, ids=None):
    import numpy as np

    from storage.features import write_features

    ids = np.arange(len(x)) if ids is None else ids
    write_features(
        path,
        ids=ids,
        labels=np.zeros(len(x), np.int64),
        splits=[split] * len(x),
        embeddings=x,
        metadata={"dataset": "t", "backbone": "none", "checkpoint_hash": "-"},
    )


def test_topk_builds_a_cosine_store_from_features_tables(tmp_path, capsys):
    import json

    import numpy as np

    from storage.simstore import SimilarityStore

    rng = np.random.default_rng(0)
    q, db = rng.standard_normal((30, 8)).astype(np.float32), 3 * rng.standard_normal((90, 8)).astype(np.float32)
    _features(tmp_path / "q.parquet", q, "query", ids=np.arange(30) + 500)
    _features(tmp_path / "db.parquet", db, "database")
    assert (
        main(
            [
                "data",
                "topk",
                str(tmp_path / "q.parquet"),
                str(tmp_path / "db.parquet"),
                "--out",
                str(tmp_path / "s"),
                "--k",
                "7",
                "--shard-size",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert json.loads(out.out)["shards"] == 4 and out.err.splitlines()[-1] == "shard 4/4"
    store = SimilarityStore(tmp_path / "s")
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    got = np.concatenate([s.neighbor_ids for s in store.iter_shards()])
    np.testing.assert_array_equal(got, np.argsort(-cos, axis=1)[:, :7])
    np.testing.assert_array_equal(np.concatenate([s.query_ids for s in store.iter_shards()]), np.arange(30) + 500)
    # the same again resumes (nothing to do); an IVF store into the same folder is refused
    assert (
        main(
            [
                "data",
                "topk",
                str(tmp_path / "q.parquet"),
                str(tmp_path / "db.parquet"),
                "--out",
                str(tmp_path / "s"),
                "--k",
                "7",
                "--shard-size",
                "8",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "topk",
                str(tmp_path / "q.parquet"),
                str(tmp_path / "db.parquet"),
                "--out",
                str(tmp_path / "s"),
                "--k",
                "7",
                "--shard-size",
                "8",
                "--search",
                "ivf",
                "--nlist",
                "2",
            ]
        )
        == 2
    )
    assert "existing store has search=" in capsys.readouterr().err


def test_topk_one_file_with_splits_and_ivf(tmp_path, capsys):
    import numpy as np

    from storage.features import write_features
    from storage.simstore import SimilarityStore

    x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    write_features(
        tmp_path / "f.parquet",
        ids=np.arange(200),
        labels=np.zeros(200, np.int64),
        splits=["query"] * 20 + ["database"] * 180,
        embeddings=x,
        metadata={"dataset": "t", "backbone": "none", "checkpoint_hash": "-"},
    )
    f = str(tmp_path / "f.parquet")
    assert (
        main(
            [
                "data",
                "topk",
                f,
                f,
                "--out",
                str(tmp_path / "s"),
                "--k",
                "5",
                "--query-split",
                "query",
                "--database-split",
                "database",
                "--search",
                "ivf",
                "--nlist",
                "4",
                "--nprobe",
                "4",
            ]
        )
        == 0
    )
    store = SimilarityStore(tmp_path / "s")
    sh = store.read_shard(0)
    assert store.manifest["search"] == {"method": "ivf", "nlist": 4, "nprobe": 4, "seed": 0}
    assert sh.query_ids.tolist() == list(range(20)) and sh.neighbor_ids.min() >= 20  # database rows only


def test_topk_bad_input_names_the_file(tmp_path, capsys):
    import numpy as np

    _features(tmp_path / "q.parquet", np.ones((4, 8), np.float32), "query")
    _features(tmp_path / "db.parquet", np.ones((9, 6), np.float32), "database")
    assert (
        main(["data", "topk", str(tmp_path / "q.parquet"), str(tmp_path / "db.parquet"), "--out", str(tmp_path / "s")])
        == 2
    )
    err = capsys.readouterr().err
    assert "db.parquet" in err and "8" in err and err.count("\n") == 1
    assert (
        main(
            [
                "data",
                "topk",
                str(tmp_path / "q.parquet"),
                str(tmp_path / "q.parquet"),
                "--out",
                str(tmp_path / "s"),
                "--k",
                "4",
                "--exclude-self",
            ]
        )
        == 2
    )
    assert "k=4 but the database has 4 items (one is excluded as self)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
