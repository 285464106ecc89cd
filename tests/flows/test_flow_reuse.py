"""Rule 1 of docs/architecture.md, "What is reused and when": outputs named after what they
depend on are the source of truth. A second run whose Prefect cache records are gone reuses
every output of the first (same paths, files untouched) instead of recomputing it."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_outputs_are_reused_without_the_prefect_cache(tiny_fewshot_twice):
    """tiny_fewshot_twice (tests/flows/conftest.py): the flow ran, its Prefect cache records
    were deleted, and it ran again in the same folder."""
    runs = tiny_fewshot_twice
    assert len(runs.outputs) >= 4, runs.outputs
    assert [r["method"] for r in runs.second["results"]] == [r["method"] for r in runs.first["results"]]
    assert runs.changed == [], runs.changed

    def accuracies(rows):  # times and memory are measured anew by each run
        return [{k: v for k, v in r.items() if "ms/episode" not in k and "MiB" not in k} for r in rows]

    assert accuracies(runs.second["results"]) == accuracies(runs.first["results"])
    # registered again with the same validation score: the champion alias stays on version 1
    assert runs.first["version"] == 1 and "champion" in runs.first["aliases"]
    assert runs.second["version"] == 2 and runs.second["aliases"] == [], runs.second
