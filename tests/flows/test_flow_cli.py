"""The `ssr` command line: help, parameter validation through the CLI and the flow form."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

from ssr_tasks.config import FewShotParams, RetrievalParams

SSR = str(Path(sys.executable).parent / "ssr")


def test_help_lists_every_subcommand():
    out = subprocess.run([SSR, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("data", "services", "run", "models"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "setting, line",
    [
        ("train.n_way=1", "ssr run: parameter train.n_way: "),
        ("train.max_steps=0", "ssr run: parameter train.max_steps: "),
        ("sweep.lr_dni=[-0.001]", "ssr run: parameters: sweep: lr_dni: Input should be greater than 0"),
    ],
)
def test_out_of_range_parameters_are_refused_by_the_cli(setting, line, tmp_path):
    out = subprocess.run(
        [SSR, "run", "fewshot", "--set", setting],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SSR_HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 2
    assert line in out.stderr and not (tmp_path / "home").exists()


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``ssr run ...`` in this process: its exit code and stderr."""
    from flows.cli import main

    code = main(["run", *argv])
    return code, capsys.readouterr().err


def test_set_takes_group_dot_field_and_keeps_the_other_fields_of_the_group(capsys):
    from flows.cli import _merge, _parse_sets

    sets = _parse_sets(
        ["train.hidden=32", "sweep.lr_dni=[0.1]", "data.dataset=glyphs", "device=cpu"], FewShotParams.FLAT
    )
    assert sets == {"train": {"hidden": 32}, "sweep": {"lr_dni": [0.1]}, "data": {"dataset": "glyphs"}, "device": "cpu"}
    assert "deprecated" not in capsys.readouterr().err
    preset = {"train": {"n_way": 3, "hidden": 64}, "sweep": {"lr_dni": [0.01, 0.1]}}
    p = FewShotParams(**_merge(preset, sets))
    assert (p.train.hidden, p.train.n_way, p.sweep, p.device) == (32, 3, {"lr_dni": [0.1]}, "cpu")
    # a whole group given as one value replaces the preset's group
    whole = _parse_sets(['sweep={"hidden": [8, 16]}'], FewShotParams.FLAT)
    assert FewShotParams(**_merge(preset, whole, frozenset({"sweep"}))).sweep == {"hidden": [8, 16]}


def test_a_flat_set_is_deprecated_and_works_like_its_group_field(capsys):
    from flows.cli import _merge, _parse_sets

    flat = _parse_sets(["lr_dni_grid=[0.1]"], FewShotParams.FLAT)
    err = capsys.readouterr().err
    assert "ssr run: note: --set lr_dni_grid=... is deprecated; use --set sweep.lr_dni=..." in err
    assert flat == _parse_sets(["sweep.lr_dni=[0.1]"], FewShotParams.FLAT) == {"sweep": {"lr_dni": [0.1]}}
    preset = {"sweep": {"lr_dni": [0.01, 0.1]}, "train": {"hidden": 64}}
    assert FewShotParams(**_merge(preset, flat)) == FewShotParams(sweep={"lr_dni": [0.1]}, train={"hidden": 64})
    assert _parse_sets(["k=20"], RetrievalParams.FLAT) == {"train": {"k": 20}}
    assert "use --set train.k=..." in capsys.readouterr().err


def test_cli_errors_name_the_parameter_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SSR_HOME", str(tmp_path / "home"))
    code, err = run_cli(capsys, "fewshot", "--set", "train.hidden=2")
    assert code == 2 and err.startswith("ssr run: parameter train.hidden: Input should be greater than or equal to 4")
    code, err = run_cli(capsys, "fewshot", "--set", "sweep.hiden=[8]")  # a model-level error: no single field
    assert code == 2 and err.startswith("ssr run: parameters: sweep: 'hiden' is not a field of the train group")
    code, err = run_cli(capsys, "fewshot", "--set", "lr_dni_grid=[-0.001]")  # deprecated, then refused as the new name
    assert code == 2 and "deprecated; use --set sweep.lr_dni" in err and "parameters: sweep: lr_dni: " in err
    code, err = run_cli(capsys, "retrieval", "--set", "train.k=1")
    assert code == 2 and "ssr run: parameter train.k: " in err
    code, err = run_cli(capsys, "fewshot", "--preset", "no-such-preset")
    assert (
        code == 2 and err.startswith("ssr run: unknown preset 'no-such-preset'; known: ") and "reproduce-fewshot" in err
    )
    code, err = run_cli(capsys, "fewshot", "--set", "train.hidden")
    assert code == 2 and "--set expects group.field=value" in err
    assert not (tmp_path / "home").exists()


def test_form_models_refuse_bad_values():
    with pytest.raises(ValidationError, match=r"train\.n_way|n_way"):
        FewShotParams(train={"n_way": 1})
    with pytest.raises(ValidationError, match="data_root"):
        FewShotParams(data={"dataset": "cifar-fs"})
    with pytest.raises(ValidationError, match="steps"):
        RetrievalParams(train={"steps": 0})
    assert FewShotParams().data.dataset == "glyphs"


def test_presets_come_from_the_deployments_file():
    from flows.cli import presets

    table = presets()
    assert {"reproduce-fewshot", "reproduce-retrieval", "reproduce-fewshot-tiny"} <= set(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the presets are written in groups
        FewShotParams(**table["reproduce-fewshot"]["fewshot"])
        RetrievalParams(**table["reproduce-retrieval"]["retrieval"])
