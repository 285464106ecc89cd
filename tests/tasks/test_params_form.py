"""The flow's UI form: parameters in groups, every field says what it is; the sweep is checked
against the train group; the flat names of earlier releases still load, with a warning."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError

from ssr_tasks.config import FewShotParams, FewShotTrainParams, RetrievalParams, RetrievalTrainParams, apply_point

GROUPS = ("data", "backbone", "train", "sweep", "evaluation", "baselines")


@pytest.mark.parametrize("model", [FewShotParams, RetrievalParams])
def test_every_form_field_has_a_description(model):
    schema = model.model_json_schema()
    assert set(GROUPS) <= set(schema["properties"])
    assert [name for name, f in schema["properties"].items() if not f.get("description")] == []
    for group, definition in schema.get("$defs", {}).items():  # the fields of each group
        missing = [name for name, f in definition.get("properties", {}).items() if not f.get("description")]
        assert missing == [], f"{group}: fields without a description: {missing}"


@pytest.mark.parametrize("model", [FewShotParams, RetrievalParams])
def test_krecip_lambda_grid_is_a_non_empty_list_in_0_1(model):
    assert model(baselines={"krecip_lambda": [0, 0.5, 1]}).baselines.krecip_lambda == [0.0, 0.5, 1.0]
    for bad in ([], [1.5], [0.2, -0.1]):
        with pytest.raises(ValueError, match=r"krecip_lambda: expected values in \[0, 1\], got "):
            model(baselines={"krecip_lambda": bad})


@pytest.mark.parametrize("model, train", [(FewShotParams, FewShotTrainParams), (RetrievalParams, RetrievalTrainParams)])
def test_the_sweep_takes_fields_of_the_train_group(model, train):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grouped form loads without a deprecation warning
        p = model(train={"hidden": 32, "seed": 4}, sweep={"hidden": [8, 16], "lr_dni": [0.1]})
    assert isinstance(p.train, train) and (p.train.hidden, p.train.seed) == (32, 4)
    first = p.first_train  # the train group at the sweep's first point
    assert isinstance(first, train) and (first.hidden, first.lr_dni, first.seed) == (8, 0.1, 4)
    assert type(apply_point(p.train, {"hidden": 16}).hidden) is int
    assert model(sweep={}).first_train == model().train  # no sweep: one trial of the train group as it is
    with pytest.raises(ValidationError, match=r"sweep: 'hiden' is not a field of the train group"):
        model(sweep={"hiden": [8]})
    with pytest.raises(ValidationError, match=r"sweep: hidden expects a non-empty list without repeats"):
        model(sweep={"hidden": [8, 8]})
    with pytest.raises(ValidationError, match=r"sweep: hidden: "):  # each point must be a valid train group
        model(sweep={"hidden": [2]})
    with pytest.raises(ValidationError, match=r"train\.hidden"):
        model(train={"hidden": 2})


def test_train_augment_is_not_swept():
    with pytest.raises(
        ValidationError, match=r"sweep: 'train_augment' is not a field of the train group that can be swept"
    ):
        FewShotParams(sweep={"train_augment": [1]})  # sweep values are numbers; train_augment is never swept


def test_retrieval_k_max_is_the_largest_k_of_any_trial():
    assert RetrievalParams(train={"k": 20}).k_max == 20
    assert RetrievalParams(train={"k": 20}, sweep={"k": [10, 40]}).k_max == 40


def test_flat_names_of_earlier_releases_still_load_with_a_deprecation_warning():
    flat = dict(
        dataset="glyphs",
        backbone="conv4-64",
        backbone_checkpoint="/ckpt.pt",
        n_shot_train=2,
        n_way=3,
        hidden=32,
        lr_dni_grid=[0.1, 0.2],
        eval_shots=[1],
        krecip_lambda=[0.5],
        device="cpu",
    )
    with pytest.warns(
        DeprecationWarning, match=r"flat parameter names are deprecated: .*n_shot_train -> train\.n_shot"
    ):
        old = FewShotParams(**flat)
    new = FewShotParams(
        data={"dataset": "glyphs"},
        backbone={"name": "conv4-64", "checkpoint": "/ckpt.pt"},
        train={"n_shot": 2, "n_way": 3, "hidden": 32},
        sweep={"lr_dni": [0.1, 0.2]},
        evaluation={"eval_shots": [1]},
        baselines={"krecip_lambda": [0.5]},
        device="cpu",
    )
    assert old == new
    with pytest.warns(DeprecationWarning, match=r"lr_dni_grid -> sweep\.lr_dni.*k -> train\.k"):
        retrieval = RetrievalParams(lr_dni_grid=[1e-3], k=20, holdout_seed=2, shard_size=9)
    assert retrieval == RetrievalParams(
        sweep={"lr_dni": [1e-3]}, train={"k": 20}, data={"holdout_seed": 2}, evaluation={"shard_size": 9}
    )
    # a flat name next to its group: the flat value is merged into the group
    with pytest.warns(DeprecationWarning):
        mixed = FewShotParams(train={"hidden": 64}, n_way=4)
    assert (mixed.train.hidden, mixed.train.n_way) == (64, 4)
