"""The flow's UI form: every field of both parameter groups says what it is."""
from __future__ import annotations

import pytest

from ssr_tasks.config import FewShotParams, RetrievalParams


@pytest.mark.parametrize("model", [FewShotParams, RetrievalParams])
def test_every_form_field_has_a_description(model):
    fields = model.model_json_schema()["properties"]
    assert [name for name, f in fields.items() if not f.get("description")] == []


@pytest.mark.parametrize("model", [FewShotParams, RetrievalParams])
def test_krecip_lambda_grid_is_a_non_empty_list_in_0_1(model):
    assert model(krecip_lambda=[0, 0.5, 1]).krecip_lambda == [0.0, 0.5, 1.0]
    for bad in ([], [1.5], [0.2, -0.1]):
        with pytest.raises(ValueError, match=r"krecip_lambda: expected values in \[0, 1\], got "):
            model(krecip_lambda=bad)
