import os
import pickle

import numpy as np
import pytest

from storage.errors import CorruptFileError, UnsafePickleError
from storage.safe_pickle import safe_load, str_keys


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_round_trip_containers_and_numpy(tmp_path, protocol):
    obj = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": [1, 2.5, None, True, "s", b"x"],
        "c": (np.int64(7), np.float64(0.5)),
        "d": {1, 2},
        "e": np.array(["u", "v"], dtype=object),
        "f": np.zeros(3, dtype=[("x", "<i4"), ("y", "<f8")]),
    }
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_load(p)
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"] == obj["b"] and out["c"] == obj["c"] and out["d"] == {1, 2}
    assert list(out["e"]) == ["u", "v"] and out["f"].dtype == obj["f"].dtype


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: .*forbidden global (posix|os|nt)\.system"):
        safe_load(p)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_other_forbidden_globals(tmp_path):
    p = tmp_path / "e.pkl"
    p.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load(p)
    p.write_bytes(pickle.dumps(pickle.Pickler))
    with pytest.raises(UnsafePickleError, match="_pickle.Pickler|pickle.Pickler"):
        safe_load(p)


def test_py2_style_bytes_keys(tmp_path):
    # CIFAR-100 pickles written by Python 2: str keys come back as bytes with encoding="bytes"
    p = tmp_path / "meta"
    p.write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"bear"]}, protocol=2))
    assert str_keys(safe_load(p, encoding="bytes")) == {"fine_label_names": [b"apple", b"bear"]}


def test_truncated_pickle(tmp_path):
    p = tmp_path / "t.pkl"
    p.write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(CorruptFileError, match=r"t\.pkl: not a readable pickle"):
        safe_load(p)
