"""The `ssr` command line: help, parameter validation through the CLI and the flow form."""
from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("setting, field", [("n_way=1", "n_way"), ("max_steps=0", "max_steps"),
                                            ("lr_dni_grid=[-0.001]", "lr_dni_grid.0")])
def test_out_of_range_parameters_are_refused_by_the_cli(setting, field):
    out = subprocess.run([SSR, "run", "fewshot", "--set", setting], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"parameter {field}:" in out.stderr


def test_form_models_refuse_bad_values():
    with pytest.raises(ValidationError, match="n_way"):
        FewShotParams(n_way=1)
    with pytest.raises(ValidationError, match="data_root"):
        FewShotParams(dataset="cifar-fs")
    with pytest.raises(ValidationError, match="steps"):
        RetrievalParams(steps=0)
    assert FewShotParams().dataset == "glyphs"


def test_presets_come_from_the_deployments_file():
    from flows.cli import presets

    table = presets()
    assert {"reproduce-fewshot", "reproduce-retrieval", "reproduce-fewshot-tiny"} <= set(table)
    FewShotParams(**table["reproduce-fewshot"]["fewshot"])
    RetrievalParams(**table["reproduce-retrieval"]["retrieval"])
