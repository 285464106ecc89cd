import pytest

from storage.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_bytes_and_text(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(p, b"abc")
    assert p.read_bytes() == b"abc"
    atomic_write_text(p, "xyz")
    assert p.read_text() == "xyz"
    assert [f.name for f in p.parent.iterdir()] == ["a.bin"]  # no temp file left


def test_atomic_path_error_keeps_old_file_and_removes_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]
