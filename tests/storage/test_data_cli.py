import argparse
import subprocess
import sys
import types

from storage.cli import main, register
from storage.errors import DatasetLayoutError


def test_prepare_delegates_to_glyphs(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("storage.glyphs")

    def prepare_glyphs(root, *, seed=0, size="default"):
        calls.append((root, seed, size))
        return {"root": str(root), "classes": 3}

    fake.prepare_glyphs = prepare_glyphs
    monkeypatch.setitem(sys.modules, "storage.glyphs", fake)
    assert main(["data", "prepare", "--root", str(tmp_path), "--seed", "3", "--size", "tiny"]) == 0
    assert calls == [(tmp_path, 3, "tiny")] and '"classes": 3' in capsys.readouterr().out

    def failing(root, *, seed=0, size="default"):
        raise DatasetLayoutError(f"{root}: cannot write here")

    fake.prepare_glyphs = failing
    assert main(["data", "prepare", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: cannot write here\n"


def test_register_into_an_outer_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="ssr")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["data", "import-landmarks", "x.pkl", "--out", str(tmp_path)])
    assert args.command == "data" and args.data_command == "import-landmarks" and callable(args.handler)
    assert args.handler(args) == 2  # x.pkl does not exist: one-line error, no traceback


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "storage.cli", "data", "download", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cifar-100" in out.stdout
