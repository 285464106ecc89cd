"""A cached task keys on every parameter field it reads.

A task with ``cache_policy=cached("field", ...)`` (``ssr_tasks.taskkit.cached``) keys only on
the fields it names: a field it reads without naming it would hand back a stale result when
only that field changed. Every such task of ``ssr_tasks`` is found here, its ``.fn`` run on
small inputs with a params object that records the fields read (directly, through a property
or through any helper it hands ``params`` to), and the reads are checked against the task's
``uses``. A new cached task fails until it has scenarios in ``SCENARIOS``; a task whose source
reads ``params.<field>`` on a path none of its scenarios runs fails as well.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from prefect import Task
from pydantic import BaseModel

import ssr_tasks
from ssr_model import FewShotSSR
from ssr_model.backbones import build_backbone
from ssr_tasks.backbone import extract_features, load_backbone, pretrain_backbone
from ssr_tasks.config import RetrievalParams
from ssr_tasks.fewshot import tasks as fewshot
from ssr_tasks.fewshot.episodes import load_split, sample_episodes
from ssr_tasks.fewshot.evaluate import FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotData, ValidationEpisodes
from ssr_tasks.handoffs import Backbone, Features
from ssr_tasks.retrieval import tasks as retrieval
from ssr_tasks.taskkit import RunFolderCache
from storage.checkpoints import RELEASED_BACKBONES, save_checkpoint
from storage.fewshot import DATASET_SPECS
from tests.authors_formats import save_ssr_checkpoint
from tests.landmark_pickles import write_sfm_pickle, write_test_pickle
from tests.tasks.conftest import TINY_RETRIEVAL

# Fields a cached task may read without keying on them. Each decides where the work runs,
# never what it returns; nothing else belongs here.
ALLOWED_UNKEYED = {
    # "auto" / "cpu" / "cuda": the device pretraining, feature extraction and scoring run on.
    # The files these tasks return are named without it (and the plain functions reuse an
    # existing file whatever the device), so even an uncached rerun returns the same hand-off;
    # choose_krecip's validation scores differ at most by float rounding between devices.
    "device",
    # The number of Ray actors scoring episodes: every chunk of episodes is scored on its own,
    # so the scores do not depend on how many actors share the chunks.
    "n_eval_actors",
}

# Reading one of these reads every field at once (a dump, a copy, iteration, repr).
WHOLE_MODEL = frozenset({"__dict__", "__iter__", "__getstate__", "__repr_args__", "model_dump", "model_dump_json",
                         "model_copy", "dict", "json", "copy"})


def cached_tasks() -> dict[str, Task]:
    """Every Prefect task of ``ssr_tasks`` whose cache keys on some parameter fields only, by module.name."""
    found = {}
    for info in pkgutil.walk_packages(ssr_tasks.__path__, "ssr_tasks."):
        for obj in vars(importlib.import_module(info.name)).values():
            if not isinstance(obj, Task):
                continue
            policies = getattr(obj.cache_policy, "policies", [obj.cache_policy])  # a sum of policies, or one
            if any(isinstance(p, RunFolderCache) and p.uses is not None for p in policies):
                found[f"{obj.fn.__module__}.{obj.fn.__qualname__}"] = obj
    return dict(sorted(found.items()))


def task_uses(task: Task) -> set[str]:
    policies = getattr(task.cache_policy, "policies", [task.cache_policy])
    return {field for p in policies if isinstance(p, RunFolderCache) and p.uses is not None for field in p.uses}


def recording(params: BaseModel) -> tuple[BaseModel, set[str]]:
    """A copy of ``params``, an instance of a subclass of its class, and the set of field
    names read from it (filled while the copy is used)."""
    cls = type(params)
    fields = frozenset(cls.model_fields)
    reads: set[str] = set()

    class Recording(cls):
        def __getattribute__(self, name):
            if name in fields:
                reads.add(name)
            elif name in WHOLE_MODEL:
                reads.update(fields)
            return super().__getattribute__(name)

    copy = Recording.model_construct(_fields_set=set(params.model_fields_set), **dict(params))
    reads.clear()
    return copy, reads


def direct_reads(task: Task, arg: str, fields: set[str]) -> set[str]:
    """The fields read in the task's own source as ``<arg>.<field>`` or ``getattr(<arg>, "<field>", ...)``."""
    found = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(task.fn)))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == arg:
            found.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == arg
              and isinstance(node.args[1], ast.Constant)):
            found.add(node.args[1].value)
    return found & fields


@dataclass(frozen=True)
class Inputs:
    """Small few-shot inputs made once by the plain code: a CIFAR-FS-layout folder of 32x32
    images, a conv4-64 pretrained for one epoch, its features table, seeded validation episodes
    and the same episodes as a SIB JSON file; and the run folder holding the small built-in glyphs."""

    params: BaseModel
    root: Path
    data: FewShotData
    backbone: Backbone
    features: Features
    val: ValidationEpisodes
    episodes_json: Path
    glyphs_home: Path


@pytest.fixture(scope="module")
def inputs(tiny_fewshot_params, tiny_image_dataset, tmp_path_factory, ssr_home, glyphs_small) -> Inputs:
    p, root, work = tiny_fewshot_params, tiny_image_dataset.resolve(), tmp_path_factory.mktemp("cache-keys")
    ckpt = pretrain_backbone(root, "cifar-fs", p.backbone, work / "backbone.pt", epochs=1, batch_size=8, seed=0)
    table = extract_features(root, "cifar-fs", p.backbone, ckpt, work / "features.parquet")
    val = load_split(table, "val")
    eps = sample_episodes(val, 2, p.n_way, p.n_shot_train, p.n_query, seed=0)

    def paths(rows):  # (n_way, n) rows of the val split -> their image paths, SIB JSON style
        return [[val.paths[i] for i in way] for way in rows]

    fixed = [{"Support": paths(s), "Query": paths(q)} for s, q in zip(eps.support.tolist(), eps.query.tolist())]
    (work / "val-episodes.json").write_text(json.dumps(fixed))
    return Inputs(p, root, FewShotData(str(root), None), Backbone(str(ckpt), p.backbone, "cifar-fs"),
                  Features(str(table), 256), ValidationEpisodes(str(eps.save(work / "val-episodes.npz"))),
                  work / "val-episodes.json", ssr_home)


# One call of a task: a label and its keyword arguments (the params object among them).
Call = tuple[str, dict]


def backbone_calls(x: Inputs, tmp: Path) -> list[Call]:
    released = tmp / "released"  # <data_root>/../backbones, where `ssr data download` puts the authors' files
    (released / "data").mkdir(parents=True)
    target = released / "backbones" / RELEASED_BACKBONES[("cifar-fs", x.params.backbone)]
    target.parent.mkdir(parents=True)
    shutil.copy(x.backbone.path, target)
    retrieval = RetrievalParams(**TINY_RETRIEVAL)  # no pretrain_batch_size / pretrain_lr: the defaults
    return [
        ("pretrain", dict(params=x.params, data_root=str(x.root), work_dir=str(tmp / "pretrain"))),
        ("checkpoint file", dict(params=x.params.model_copy(update={"backbone_checkpoint": x.backbone.path}),
                                 data_root=str(x.root), work_dir=str(tmp / "unused"))),
        ("released", dict(params=x.params.model_copy(update={"backbone_checkpoint": "released"}),
                          data_root=str(released / "data"), work_dir=str(tmp / "unused"))),
        ("retrieval pretrain", dict(params=retrieval, data_root=str(x.root), work_dir=str(tmp / "retrieval"))),
    ]


def prepare_data_calls(x: Inputs, tmp: Path) -> list[Call]:
    glyphs = x.params.model_copy(update={"dataset": "glyphs", "data_root": None, "glyphs_size": "small"})
    return [
        ("built-in glyphs", dict(params=glyphs, run_dir=str(x.glyphs_home))),  # rendered once per session
        ("dataset root", dict(params=x.params, run_dir=str(tmp))),
        ("fixed episodes file", dict(params=x.params.model_copy(update={"val_episodes_json": str(x.episodes_json)}),
                                     run_dir=str(tmp))),
    ]


def extract_features_calls(x: Inputs, tmp: Path) -> list[Call]:
    return [("features", dict(params=x.params, data=x.data, backbone=x.backbone, work_dir=str(tmp)))]


def validation_episodes_calls(x: Inputs, tmp: Path) -> list[Call]:
    fixed = FewShotData(x.data.root, str(x.episodes_json))
    return [("seeded", dict(params=x.params, features=x.features, data=x.data, work_dir=str(tmp))),
            ("fixed episodes file", dict(params=x.params, features=x.features, data=fixed, work_dir=str(tmp)))]


def training_features_calls(x: Inputs, tmp: Path) -> list[Call]:
    return [(augment, dict(params=x.params.model_copy(update={"train_augment": augment}), data=x.data,
                           backbone=x.backbone, work_dir=str(tmp)))
            for augment in ("none", "online", "views:2")]


def choose_krecip_calls(x: Inputs, tmp: Path) -> list[Call]:
    return [("grid", dict(params=x.params, features=x.features, val=x.val))]


def released_params(x: Inputs, tmp: Path) -> BaseModel:
    """``x.params`` with a ``netSSRBest.pth`` made of ``x.backbone`` (the backbone of
    ``x.features``) and an untrained 2-step SSR for its episodes (hidden 8)."""
    p = x.params
    net = load_backbone(x.backbone.name, x.backbone.spec, Path(x.backbone.path))
    torch.manual_seed(0)
    ssr = FewShotSSR(x.features.dim, p.n_way, p.n_way * p.n_query, steps=2, hidden=8)
    checkpoint = tmp / "netSSRBest.pth"
    save_ssr_checkpoint(checkpoint, net.state_dict(), ssr.state_dict(), 2)
    return p.model_copy(update={"released_checkpoint": str(checkpoint)})


def released_model_calls(x: Inputs, tmp: Path) -> list[Call]:
    return [("netSSRBest.pth", dict(params=released_params(x, tmp), work_dir=str(tmp)))]


def released_trials_calls(x: Inputs, tmp: Path) -> list[Call]:
    p = released_params(x, tmp)
    released = fewshot.released_model.fn(p, str(tmp))
    return [("validation", dict(params=p, features=x.features, val=x.val, released=released))]


def glyph_retrieval(x: Inputs) -> tuple[RetrievalParams, dict]:
    """Retrieval params of the small built-in glyphs and their ``prepare_data`` arguments."""
    return RetrievalParams(**TINY_RETRIEVAL), dict(run_dir=str(x.glyphs_home))  # rendered once per session


def landmark_retrieval(tmp: Path) -> tuple[RetrievalParams, dict]:
    """Retrieval params of the authors' landmark pickles (small synthetic rOxford5k and
    SfM-120k, ``tests.landmark_pickles``) and their ``prepare_data`` arguments."""
    root = tmp / "landmark-pickles"
    root.mkdir(exist_ok=True)
    write_test_pickle(root, "roxford5k")
    write_sfm_pickle(root)
    return (RetrievalParams(**{**TINY_RETRIEVAL, "dataset": "roxford5k", "data_root": str(root)}),
            dict(run_dir=str(tmp / "landmark-run")))


def retrieval_prepare_data_calls(x: Inputs, tmp: Path) -> list[Call]:
    (glyphs, at), (landmarks, there) = glyph_retrieval(x), landmark_retrieval(tmp)
    return [("built-in glyphs", dict(params=glyphs, **at)), ("landmark pickles", dict(params=landmarks, **there))]


def retrieval_extract_features_calls(x: Inputs, tmp: Path) -> list[Call]:
    (glyphs, at), (landmarks, there) = glyph_retrieval(x), landmark_retrieval(tmp)
    torch.manual_seed(0)  # an untrained conv4-64 for the 1-channel glyphs: the reads do not depend on its weights
    spec = DATASET_SPECS["glyphs"]
    net = build_backbone(glyphs.backbone, spec.image_size, in_channels=spec.channels)
    backbone = Backbone(str(save_checkpoint(tmp / "glyphs-backbone.pt", net.state_dict())), glyphs.backbone, "glyphs")
    return [
        ("built-in glyphs", dict(params=glyphs, data=retrieval.prepare_data.fn(glyphs, **at), backbone=backbone,
                                 work_dir=str(tmp))),
        ("landmark pickles", dict(params=landmarks, data=retrieval.prepare_data.fn(landmarks, **there), backbone=None,
                                  work_dir=str(tmp))),
    ]


def rank_methods_calls(x: Inputs, tmp: Path) -> list[Call]:
    landmarks, there = landmark_retrieval(tmp)
    features = retrieval.extract_features.fn(landmarks, retrieval.prepare_data.fn(landmarks, **there), None, str(tmp))
    return [("landmark features", dict(params=landmarks, features=features, work_dir=str(tmp)))]


SCENARIOS: dict[str, Callable[..., list[Call]]] = {
    "ssr_tasks.backbone.get_backbone": backbone_calls,
    "ssr_tasks.fewshot.tasks.prepare_data": prepare_data_calls,
    "ssr_tasks.fewshot.tasks.extract_features": extract_features_calls,
    "ssr_tasks.fewshot.tasks.validation_episodes": validation_episodes_calls,
    "ssr_tasks.fewshot.tasks.training_features": training_features_calls,
    "ssr_tasks.fewshot.tasks.choose_krecip": choose_krecip_calls,
    "ssr_tasks.fewshot.tasks.released_model": released_model_calls,
    "ssr_tasks.fewshot.tasks.released_trials": released_trials_calls,
    "ssr_tasks.retrieval.tasks.prepare_data": retrieval_prepare_data_calls,
    "ssr_tasks.retrieval.tasks.extract_features": retrieval_extract_features_calls,
    "ssr_tasks.retrieval.tasks.rank_methods": rank_methods_calls,
}

TASKS = cached_tasks()


def test_the_known_cached_tasks_are_found():
    assert set(SCENARIOS) <= set(TASKS), f"not found as cached tasks: {sorted(set(SCENARIOS) - set(TASKS))}"


@pytest.fixture
def no_ray(monkeypatch):
    """Validation scoring in this process: the evaluator a Ray actor would run, on a CPU-only
    'cluster' (the pool takes values, never ``params``; the task body reads the same fields)."""
    import ssr_tasks.device
    import ssr_tasks.fewshot.tasks

    def evaluate_in_process(features, split, episodes, model, krecip=(), with_ssr=True, n_actors=0, device="cpu",
                            progress=None, peers=(), **_):
        return FewShotEvaluator(str(features), split, model, device, 1).evaluate(episodes, list(krecip), with_ssr,
                                                                                 list(peers))

    monkeypatch.setattr(ssr_tasks.device, "cluster_has_gpu", lambda: False)
    monkeypatch.setattr(ssr_tasks.fewshot.tasks, "evaluate_with_pool", evaluate_in_process)


def _named(arg: str, fields: set[str]) -> str:
    return ", ".join(f"{arg}.{field}" for field in sorted(fields))


@pytest.mark.parametrize("name", list(TASKS))
def test_cached_task_keys_on_every_field_it_reads(name, task_env, no_ray, inputs, tmp_path):
    task = TASKS[name]
    assert name in SCENARIOS, (f"{name} is a cached task without scenarios: add calls of it to SCENARIOS in "
                               f"{Path(__file__).name} so that the fields it reads are checked against its cached(...)")
    uses = task_uses(task)
    keyed = f"cached({', '.join(map(repr, sorted(uses)))})"
    read_by_any: dict[str, set[str]] = {}  # by argument name: the fields some scenario read
    fields_of: dict[str, set[str]] = {}  # by argument name: the fields of the params classes passed
    for label, kwargs in SCENARIOS[name](inputs, tmp_path):
        recorders = {}
        for arg, value in kwargs.items():
            if isinstance(value, BaseModel):
                kwargs[arg], recorders[arg] = recording(value)
                fields_of.setdefault(arg, set()).update(type(value).model_fields)
        assert recorders, f"{name} [{label}]: no params object among the arguments {sorted(kwargs)}"
        task.fn(**kwargs)
        for arg, reads in recorders.items():
            unkeyed = reads - uses - ALLOWED_UNKEYED
            assert not unkeyed, (f"{name} [{label}] reads {_named(arg, unkeyed)} but its cache keys only on {keyed}: "
                                 "add the field(s) to its cached(...)")
            read_by_any.setdefault(arg, set()).update(reads)

    unknown = uses - set().union(*fields_of.values())
    assert not unknown, f"{name}: {keyed} names {sorted(unknown)}, not fields of its params"
    for arg, fields in fields_of.items():
        unexercised = direct_reads(task, arg, fields) - read_by_any[arg]
        assert not unexercised, (f"{name} reads {_named(arg, unexercised)} on a path none of its scenarios runs: "
                                 "add a call that takes that path to SCENARIOS")
