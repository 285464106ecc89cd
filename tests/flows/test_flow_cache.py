"""Prefect's task cache never hands back paths of a deleted run folder, and keys only on the
parameter groups a task takes."""

from __future__ import annotations

import shutil

import pytest

from ssr_tasks.config import FewShotParams
from tests.flows.test_flow_pipelines import TINY_FEWSHOT


@pytest.mark.slow
def test_second_run_completes_after_the_run_folder_is_deleted(tiny_fewshot_twice, monkeypatch):
    """The run folder of tiny_fewshot_twice (two runs, Prefect cache records written by the
    second) is deleted, and the same flow runs again there."""
    from flows.ssr_flow import ssr

    runs = tiny_fewshot_twice
    assert runs.cache_keys_after_first  # the cache records live in the run folder
    _assert_trials_logged_live(runs.trials_of_first)
    assert runs.second["model_uri"] == "models:/ssr-cache/2"  # the same registry, while the folder lives
    monkeypatch.setenv("SSR_HOME", str(runs.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.rmtree(runs.home)
    third = ssr(pipeline="fewshot", fewshot=runs.params)  # nothing cached may point into the deleted folder
    assert third["model_uri"] == "models:/ssr-cache/1"  # a new registry: the old one went with the folder
    assert [r["method"] for r in third["results"]] == [r["method"] for r in runs.first["results"]]


def test_cache_key_counts_only_the_groups_a_task_takes():
    from types import SimpleNamespace

    from ssr_tasks.backbone import get_backbone

    policy = get_backbone.cache_policy
    base = FewShotParams(**TINY_FEWSHOT)
    # what compute_key reads of a task run context: the task (for its source). An instance
    # attribute: a Task set as a class attribute would bind itself to that class (descriptor).
    ctx = SimpleNamespace(task=get_backbone)

    def key(params):  # the inputs as flows/fewshot.py passes them
        inputs = {
            "backbone": params.backbone,
            "spec": "glyphs",
            "seed": params.train.seed,
            "data_root": "/d",
            "work_dir": "/w",
            "device": params.device,
        }
        return policy.compute_key(ctx, inputs, {})

    def changed(**groups):
        dump = base.model_dump()
        return FewShotParams(**{**dump, **{g: {**dump[g], **fields} for g, fields in groups.items()}})

    assert key(base) == key(changed(evaluation={"n_test_episodes": 7}, train={"hidden": 64}))
    assert key(base) == key(base.model_copy(update={"sweep": {"lr_dni": [0.5]}}))
    assert key(base) != key(changed(backbone={"pretrain_epochs": 2}))
    assert key(base) != key(changed(train={"seed": 5}))  # the seed of pretraining, passed alone


def _assert_trials_logged_live(trials) -> None:
    """Each trial's nested run got Tune's reports while training (``progress`` is logged only
    then), and the report afterwards reused that run instead of making another."""
    assert [t.tag for t in trials] == ["lr_dni=0.1"]
    assert trials[0].n_progress >= 2
    assert "best_val_acc" in trials[0].metrics and trials[0].status == "FINISHED"
