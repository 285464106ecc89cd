"""The flow's UI form: every field of both parameter groups says what it is."""
from __future__ import annotations

import pytest

from ssr_tasks.config import FewShotParams, RetrievalParams


@pytest.mark.parametrize("model", [FewShotParams, RetrievalParams])
def test_every_form_field_has_a_description(model):
    fields = model.model_json_schema()["properties"]
    assert [name for name, f in fields.items() if not f.get("description")] == []
