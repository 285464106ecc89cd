"""Distractor import (``ssr data import-distractors``): npy, revisitop-style pickle and Parquet
sources in both orientations, ids after the test database's, rerun no-op, bad input, RSS."""

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.cli import main
from storage.distractors import import_distractors
from storage.errors import DataValueError, StorageError
from storage.features import read_features, read_metadata, write_features

D = 8


def _test_db(tmp_path, n=5):
    """A test database table as ``import_landmarks`` writes it: ids 0..n-1, label -1, split database, paths."""
    x = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    p = write_features(
        tmp_path / "database.parquet",
        ids=np.arange(n),
        labels=np.full(n, -1),
        splits="database",
        embeddings=x,
        paths=[f"img{i}" for i in range(n)],
        metadata={"dataset": "roxford5k", "backbone": "b", "checkpoint_hash": "h"},
    )
    return p, x


def _distractors(m=7):
    return np.random.default_rng(1).standard_normal((m, D)).astype(np.float32)


def _write(tmp_path, fmt, x, transposed):
    arr = x.T if transposed else x
    if fmt == "npy":
        p = tmp_path / "r1m.npy"
        np.save(p, arr)
    elif fmt == "pickle":
        p = tmp_path / "r1m.pkl"
        with open(p, "wb") as f:
            pickle.dump({"X": arr.astype(np.float64), "imlist": [f"d{i}" for i in range(len(x))]}, f)
    elif fmt == "parquet-list":
        p = tmp_path / "r1m.parquet"
        rows = arr
        pq.write_table(
            pa.table({"embedding": pa.array([r.tolist() for r in rows], pa.list_(pa.float32()))}),
            p,
            row_group_size=3,
        )
    else:  # parquet-wide: one numeric column per dimension (N, D) or per image (D, N)
        p = tmp_path / "r1m.parquet"
        pq.write_table(pa.table({f"c{j}": arr[:, j] for j in range(arr.shape[1])}), p, row_group_size=3)
    return p


@pytest.mark.parametrize("transposed", [False, True], ids=["N-D", "D-N"])
@pytest.mark.parametrize("fmt", ["npy", "pickle", "parquet-list", "parquet-wide"])
def test_import_appends_after_the_database_ids(tmp_path, fmt, transposed):
    table, x = _test_db(tmp_path)
    extra = _distractors()
    src = _write(tmp_path, fmt, extra, transposed)
    done = import_distractors(table, src, block_rows=3)
    assert (done.n_before, done.n_added, done.first_id) == (5, 7, 5)
    t = read_features(table)
    assert t.ids.tolist() == list(range(12))
    np.testing.assert_allclose(t.embeddings[:5], x)
    np.testing.assert_allclose(t.embeddings[5:], extra, rtol=1e-6)
    assert set(t.splits) == {"database"} and t.labels[5:].tolist() == [-1] * 7
    assert t.paths[:5] == [f"img{i}" for i in range(5)]
    if fmt == "pickle":
        assert t.paths[5:] == [f"d{i}" for i in range(7)]
    assert pq.ParquetFile(table).metadata.num_row_groups >= 3  # appended as row groups, not one
    # a rerun is a no-op; the record names the source
    again = import_distractors(table, src, block_rows=3)
    assert again.n_added == 0 and len(read_features(table)) == 12
    rec = json.loads(read_metadata(table)["distractors"])
    assert rec == [{"source": src.name, "size": src.stat().st_size, "rows": 7, "first_id": 5}]


def test_cli_writes_to_out_and_leaves_the_table(tmp_path, capsys):
    table, _ = _test_db(tmp_path)
    src = _write(tmp_path, "npy", _distractors(), transposed=True)
    out = tmp_path / "with-r1m.parquet"
    assert main(["data", "import-distractors", str(table), str(src), "--out", str(out), "--block-rows", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 7
    assert len(read_features(table)) == 5 and len(read_features(out)) == 12
    meta = pq.ParquetFile(out).metadata  # original rows, then the distractors, as row groups of blocks
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 1, 4, 3]


@pytest.mark.parametrize(
    "shape, message",
    [
        ((D, D), "ambiguous, both sides equal the database's D = 8"),
        ((6, 5), "has no side equal to the database's D = 8"),
        ((3, D, 2), "must be 2-D"),
    ],
)
def test_bad_shapes_name_file_and_shapes(tmp_path, shape, message):
    table, _ = _test_db(tmp_path)
    src = tmp_path / "bad.npy"
    np.save(src, np.zeros(shape, np.float32))
    with pytest.raises(StorageError) as e:
        import_distractors(table, src)
    assert "bad.npy" in str(e.value) and str(shape) in str(e.value) and message in str(e.value)
    assert len(read_features(table)) == 5  # untouched


def test_bad_inputs_leave_the_table_untouched(tmp_path, capsys):
    table, _ = _test_db(tmp_path)
    bad = _distractors()
    bad[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataValueError, match=r"nan.npy: distractor row 4 has NaN or inf"):
        import_distractors(table, tmp_path / "nan.npy", block_rows=3)
    with open(tmp_path / "nokey.pkl", "wb") as f:
        pickle.dump({"Q": _distractors()}, f)
    with pytest.raises(StorageError, match=r"nokey.pkl: no distractor features; expected one of the keys"):
        import_distractors(table, tmp_path / "nokey.pkl")
    (tmp_path / "x.txt").write_text("1 2 3")
    assert main(["data", "import-distractors", str(table), str(tmp_path / "x.txt")]) == 2
    assert "unknown distractor format '.txt'" in capsys.readouterr().err
    assert len(read_features(table)) == 5 and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_import_of_a_large_npy_keeps_rss_bounded(tmp_path):
    """A memory-mapped 200,000 x 128 float32 source (98 MiB), imported in blocks of 16,384
    rows: the peak RSS growth of the import is under 96 MiB and within 24 MiB of the growth
    for its first 25,000 rows (12 MiB), i.e. it does not grow with N (measured: about 70 MiB
    for both, Arrow's and the Parquet writer's working memory)."""
    D_big, n = 128, 200_000
    src = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(n, D_big))
    for a in range(0, n, 50_000):
        big[a : a + 50_000] = np.random.default_rng(a).standard_normal((50_000, D_big), dtype=np.float32)
    np.save(tmp_path / "small.npy", big[:25_000])
    big.flush()
    del big
    np.save(tmp_path / "warm.npy", np.ones((10, D_big), np.float32))
    table = write_features(
        tmp_path / "db128.parquet",
        ids=np.arange(5),
        labels=np.full(5, -1),
        splits="database",
        embeddings=np.ones((5, D_big), np.float32),
        metadata={"dataset": "d", "backbone": "b", "checkpoint_hash": "h"},
    )
    # a fresh process; a first tiny import loads the Parquet code and pools, then for each
    # import the peak (VmHWM) is reset and its growth over the RSS before it printed
    code = textwrap.dedent(
        f"""
        from storage.distractors import import_distractors
        def kib(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
        import_distractors({str(table)!r}, {str(tmp_path / "warm.npy")!r}, out={str(tmp_path / "warm.parquet")!r})
        for name in ("small.npy", "big.npy"):
            open("/proc/self/clear_refs", "w").write("5")
            before = kib("VmRSS")
            import_distractors({str(table)!r}, {str(tmp_path)!r} + "/" + name, out={str(tmp_path)!r} + "/out-" + name + ".parquet", block_rows=16384)
            print((kib("VmHWM") - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    small_mib, big_mib = map(float, out.stdout.split())
    print(f"import peak RSS growth: {small_mib:.1f} MiB (25k rows), {big_mib:.1f} MiB (200k rows, 98 MiB)")
    assert big_mib < 96 and big_mib - small_mib < 24
    t = read_features(tmp_path / "out-big.npy.parquet")
    assert len(t) == n + 5 and t.ids[-1] == n + 4
