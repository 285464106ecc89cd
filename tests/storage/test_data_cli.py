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
    out = subprocess.run([sys.executable, "-m", "storage.cli", "data", "download", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cifar-100" in out.stdout
