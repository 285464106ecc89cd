"""A task's cache key is what it reads: it takes parameter groups, never the whole parameters.

Every cached task keys on its source and its inputs (``ssr_tasks.taskkit.CACHE``), so a task
that took a whole ``FewShotParams`` / ``RetrievalParams`` would miss its cache whenever any
unrelated field changed (a new sweep point, another evaluation setting). The tasks are found
by walking ``ssr_tasks`` (a new task is checked without being listed here), and one cached
task's key is computed for parameters that differ in one group at a time.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
import typing
from typing import Any

import pytest
from prefect import Task
from pydantic import BaseModel

import ssr_tasks
from ssr_tasks.config import FewShotParams, FewShotTrainParams, RetrievalParams, Sweep
from ssr_tasks.retrieval import tasks as retrieval
from ssr_tasks.retrieval.handoffs import RetrievalFeatures
from ssr_tasks.taskkit import CACHE, RunFolderCache
from tests.tasks.conftest import TINY_RETRIEVAL

WHOLE = (FewShotParams, RetrievalParams)

# Tasks that take the whole parameters and are never cached: they write a report of the whole
# run (its title names the data set and backbone, its table the evaluation settings) and are
# run again on every flow run. Only uncached tasks may be listed here.
WHOLE_PARAMS_UNCACHED = {"ssr_tasks.fewshot.report.write_report", "ssr_tasks.retrieval.report.write_report"}


def prefect_tasks() -> dict[str, Task]:
    """Every Prefect task defined in a module of ``ssr_tasks``, by module.name."""
    found = {}
    for info in pkgutil.walk_packages(ssr_tasks.__path__, "ssr_tasks."):
        for obj in vars(importlib.import_module(info.name)).values():
            if isinstance(obj, Task) and obj.fn.__module__ == info.name:
                found[f"{obj.fn.__module__}.{obj.fn.__qualname__}"] = obj
    return dict(sorted(found.items()))


def is_cached(task: Task) -> bool:
    policies = getattr(task.cache_policy, "policies", [task.cache_policy])  # a sum of policies, or one
    return any(isinstance(p, RunFolderCache) for p in policies)


def classes_in(annotation: Any) -> set[type]:
    """The classes an annotation names (``A | None``, ``Optional[A]``, ``list[A]``... unpacked)."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return {annotation}
    found: set[type] = set()
    origin = typing.get_origin(annotation)
    if isinstance(origin, type) and origin is not types.UnionType:
        found.add(origin)
    for arg in typing.get_args(annotation):
        found |= classes_in(arg)
    return found


def whole_params_arguments(task: Task) -> list[str]:
    """The arguments of ``task`` that take (or may take) the whole parameters: annotated with
    FewShotParams / RetrievalParams (or a base or subclass of them), or not annotated at all."""
    hints = typing.get_type_hints(task.fn)
    found = []
    for name in inspect.signature(task.fn).parameters:
        if name not in hints:
            found.append(f"{name} (not annotated)")
        elif any(
            issubclass(c, WHOLE) or (issubclass(c, BaseModel) and any(issubclass(w, c) for w in WHOLE))
            for c in classes_in(hints[name])
            if isinstance(c, type)
        ):
            found.append(name)
    return found


TASKS = prefect_tasks()


def test_the_tasks_are_found():
    assert {
        "ssr_tasks.backbone.get_backbone",
        "ssr_tasks.fewshot.tasks.validation_episodes",
        "ssr_tasks.retrieval.tasks.rank_methods",
        "ssr_tasks.fewshot.report.write_report",
    } <= set(TASKS)
    assert sum(map(is_cached, TASKS.values())) >= 10


@pytest.mark.parametrize("name", list(TASKS))
def test_no_task_takes_the_whole_parameters(name):
    task, whole = TASKS[name], whole_params_arguments(TASKS[name])
    if name in WHOLE_PARAMS_UNCACHED:
        assert not is_cached(task), f"{name} takes the whole parameters: it must not be cached"
        return
    assert not whole, (
        f"{name} takes the whole parameters in {', '.join(whole)}: pass it the groups (or fields) it "
        "reads, so that its cache key is what it reads"
    )


def test_the_check_catches_a_task_that_takes_the_whole_parameters():
    from prefect import task

    @task(cache_policy=CACHE)
    def takes_all(params: FewShotParams, work_dir: str) -> str: ...

    @task(cache_policy=CACHE)
    def takes_either(params: FewShotParams | RetrievalParams | None, work_dir: str) -> str: ...

    @task(cache_policy=CACHE)
    def takes_groups(train: FewShotTrainParams, sweep: Sweep, seed: int) -> str: ...

    assert whole_params_arguments(takes_all) == ["params"] and whole_params_arguments(takes_either) == ["params"]
    assert whole_params_arguments(takes_groups) == []


# ---- one cached task's key, as the flow calls it ------------------------------------------------------


FEATURES = RetrievalFeatures("/runs/features.parquet", 256, 500, 70, "/runs/features.parquet")


def key_of(task: Task, params: RetrievalParams, given: dict[str, Any]) -> str:
    """The cache key of ``task`` for ``params``: the arguments in ``given`` as they are, the
    others by the type of the task's argument (the group of that type, or the whole
    parameters if that is what it takes). So the key follows the task's signature."""
    hints = typing.get_type_hints(task.fn)
    inputs = {}
    for name in inspect.signature(task.fn).parameters:
        if name in given:
            inputs[name] = given[name]
        elif isinstance(params, hints[name]):
            inputs[name] = params
        else:
            [group] = [
                getattr(params, g) for g in type(params).model_fields if isinstance(getattr(params, g), hints[name])
            ]
            inputs[name] = group
    return RunFolderCache().compute_key(types.SimpleNamespace(task=task), inputs, {})


def rank_methods_key(params: RetrievalParams) -> str:
    """The cache key of ``rank_methods`` called as flows/retrieval.py calls it."""
    return key_of(
        retrieval.rank_methods,
        params,
        {"k": params.k_max, "shard_size": params.evaluation.shard_size, "features": FEATURES, "work_dir": "/runs/work"},
    )


def changed(params: RetrievalParams, group: str, **fields) -> RetrievalParams:
    dump = params.model_dump()
    return RetrievalParams.model_validate({**dump, group: {**dump[group], **fields}})


def test_rank_methods_keys_on_the_groups_it_takes_and_not_on_the_others():
    base = RetrievalParams(**TINY_RETRIEVAL)
    key = rank_methods_key(base)
    assert key and rank_methods_key(RetrievalParams(**TINY_RETRIEVAL)) == key

    # groups it takes: baselines (the grids chosen on validation) and train (its validation queries)
    assert rank_methods_key(changed(base, "baselines", qe_n_grid=[1, 5])) != key
    assert rank_methods_key(changed(base, "train", n_val_queries=12)) != key
    assert rank_methods_key(changed(base, "evaluation", shard_size=7)) != key  # the shard size, passed alone

    # groups it does not take: changing them cannot miss its cache
    for group, fields in (
        ("data", {"holdout_seed": 3}),
        ("backbone", {"pretrain_epochs": 2}),
        ("evaluation", {"n_rerank_actors": 3}),
        ("sweep", None),
    ):
        other = (
            base.model_copy(update={"sweep": {"lr_dni": [1e-3, 1e-2]}})
            if group == "sweep"
            else changed(base, group, **fields)
        )
        assert other != base and rank_methods_key(other) == key, f"rank_methods' key changed with {group}"
    assert rank_methods_key(base.model_copy(update={"device": "cuda", "model_name": "other"})) == key


def test_the_key_check_catches_a_task_that_takes_the_whole_parameters():
    from prefect import task

    @task(cache_policy=CACHE)
    def rank_all(params: RetrievalParams, features: RetrievalFeatures, work_dir: str) -> str: ...

    base = RetrievalParams(**TINY_RETRIEVAL)
    given = {"features": FEATURES, "work_dir": "/runs/work"}
    assert key_of(rank_all, changed(base, "data", holdout_seed=3), given) != key_of(rank_all, base, given)
