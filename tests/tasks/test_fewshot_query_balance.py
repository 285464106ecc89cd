"""SSR trained for imbalanced queries (train.query_balance) and SSR composed with TIM / PT-MAP
(ssr+tim, ssr+pt-map): parameters, training and validation episodes, evaluation, table rows and
registered models, on the 16-wide synthetic features (issue 21, items 2 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ssr_model.baselines import pt_map, tim_gd
from ssr_model.baselines.peers import COMPOSED_METHODS
from ssr_model.packaged import FewShotClassifier
from ssr_tasks import reporting
from ssr_tasks.config import FewShotParams, FewShotTrainParams
from ssr_tasks.fewshot import tasks
from ssr_tasks.fewshot.episodes import (
    EpisodeIndices,
    dirichlet_counts,
    gather,
    load_split,
    sample_dirichlet_episodes,
    sample_episodes,
)
from ssr_tasks.fewshot.evaluate import FewShotEvaluator
from ssr_tasks.fewshot.handoffs import FewShotData, FewShotModel, ShotResult
from ssr_tasks.fewshot.train import train_stage
from ssr_tasks.fewshot.train_features import TableFeatures
from ssr_tasks.handoffs import Features
from ssr_tasks.tracking import Tracker


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (two threads on a loaded 2-core machine make TIM's 1,000 small steps 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_query_balance_parameter():
    assert FewShotParams().training_balances == ["balanced"]
    dirichlet_run = FewShotParams(evaluation={"query_balance": "dirichlet:2"})
    assert dirichlet_run.training_balances == ["balanced", "dirichlet:2"]  # auto: both ways in a Dirichlet run
    both = FewShotParams(train={"query_balance": ["dirichlet:2", "balanced"]})
    assert both.training_balances == ["dirichlet:2", "balanced"]  # the first is the primary model
    assert FewShotParams(train={"query_balance": ["dirichlet:0.5"]}).train.query_balance == "dirichlet:0.5"
    only = FewShotParams(train={"query_balance": "balanced"}, evaluation={"query_balance": "dirichlet:2"})
    assert only.training_balances == ["balanced"]
    assert FewShotTrainParams().trained_balance == "balanced"
    assert FewShotTrainParams(query_balance="dirichlet:2").trained_balance == "dirichlet:2"
    assert (dirichlet_run.registered_name("balanced"), dirichlet_run.registered_name("dirichlet:2")) == (
        "ssr-fewshot",
        "ssr-fewshot-dirichlet2",
    )
    with pytest.raises(ValidationError, match=r"(?s)train\.query_balance.*expected 'balanced' or 'dirichlet:ALPHA'"):
        FewShotParams(train={"query_balance": "dirichlet"})
    with pytest.raises(ValidationError, match="without repeats"):
        FewShotParams(train={"query_balance": ["balanced", "balanced"]})
    with pytest.raises(ValidationError, match="query_balance' is not a field of the train group that can be swept"):
        FewShotParams(sweep={"query_balance": [1]})
    assert FewShotParams(evaluation={"methods": ["baseline", "ssr", "ssr+tim", "ssr+pt-map"]}).evaluation.methods[
        2:
    ] == [
        "ssr+tim",
        "ssr+pt-map",
    ]
    assert not set(COMPOSED_METHODS) & set(FewShotParams().evaluation.methods)  # asked for by name only


class RecordingFeatures(TableFeatures):
    """The features table as the training source, keeping every batch of episodes it gathered."""

    def __init__(self, split):
        super().__init__(split)
        self.batches: list[EpisodeIndices] = []

    def gather(self, episodes, iteration, device):
        self.batches.append(episodes)
        return super().gather(episodes, iteration, device)


@pytest.mark.parametrize("balance", ["balanced", "dirichlet:2"])
def test_training_episodes_draw_their_query_counts_like_the_test(synthetic_features, tmp_path, balance):
    cfg = FewShotTrainParams(
        n_way=3, n_query=5, hidden=8, iterations_first=3, val_every=3, batch_episodes=2, seed=1, query_balance=balance
    )
    train, val = load_split(synthetic_features, "train"), load_split(synthetic_features, "val")
    source = RecordingFeatures(train)
    val_eps = sample_episodes(val, 2, 3, 1, 5, seed=0)
    train_stage(cfg, 1, source, val, val_eps, tmp_path / "stage", None, torch.device("cpu"))
    assert len(source.batches) == 3
    if balance == "balanced":
        assert all(b.query_labels is None and b.query.shape == (2, 3, 5) for b in source.batches)
        return
    for it, batch in enumerate(source.batches):
        assert batch.query.shape == batch.query_labels.shape == (2, 15)
        counts = np.stack([np.bincount(lab, minlength=3) for lab in batch.query_labels])
        # by hand: the counts of the batch's first episode are the first Dirichlet(2) draw of its seed
        rng = np.random.default_rng((cfg.seed * 1000 + 1) * 10_000_000 + it)
        np.testing.assert_array_equal(counts[0], dirichlet_counts(2.0, 3, 15, rng))
        for e in range(2):  # each query's label names its class among the support's
            classes = train.labels[batch.support[e, :, 0]]
            assert (train.labels[batch.query[e]] == classes[batch.query_labels[e]]).all()
    all_counts = np.concatenate([[np.bincount(lab, minlength=3) for lab in b.query_labels] for b in source.batches])
    assert (all_counts.sum(1) == 15).all() and not (all_counts == 5).all()  # imbalanced, 15 queries in all


def test_validation_episodes_follow_the_training_balance(task_env, synthetic_features, tmp_path):
    features, data = Features(str(synthetic_features), 16), FewShotData(str(tmp_path), None)
    shape = FewShotTrainParams(n_way=3, n_query=5).episode
    balanced = tasks.validation_episodes.fn(6, shape, 0, features, data, str(tmp_path))
    dirichlet = tasks.validation_episodes.fn(6, shape, 0, features, data, str(tmp_path), "dirichlet:2")
    assert balanced.path != dirichlet.path and balanced.load().query_labels is None
    eps = dirichlet.load()
    counts = np.stack([np.bincount(lab, minlength=3) for lab in eps.query_labels])
    assert eps.query.shape == (6, 15) and (counts.sum(1) == 15).all() and not (counts == 5).all()
    again = tasks.validation_episodes.fn(6, shape, 0, features, data, str(tmp_path), "dirichlet:2")
    assert again.path == dirichlet.path  # reused


def _model(tmp_path, n_way=3, n_query=15, lr_dni=1.0, steps=2) -> FewShotModel:
    cfg = FewShotTrainParams(n_way=n_way, n_query=n_query // n_way, hidden=8, lr_dni=lr_dni)
    torch.manual_seed(0)
    torch.save(cfg.build(16, steps).state_dict(), tmp_path / "ssr.pt")
    return FewShotModel(str(tmp_path / "ssr.pt"), cfg, 16, steps)


def test_composition_is_the_peer_on_ssr_refined_features(synthetic_features, tmp_path):
    """By hand on tiny episodes: ssr+tim is TIM on SSR's refined prototypes (1-shot) and queries,
    not TIM on the raw features; at 2 shots each support moves with its class prototype."""
    split = load_split(synthetic_features, "test")
    model = _model(tmp_path).build()
    eps = sample_dirichlet_episodes(split, 3, 3, 1, 15, alpha=2.0, seed=4)
    support, query, labels = gather(split, eps)
    refined_support, refined_query = model.refine_episode(support, query)
    assert refined_support.shape == support.shape and refined_query.shape == query.shape
    assert not torch.allclose(refined_query, query, atol=1e-4)  # SSR moved the features
    # the refined features are those SSR scores with: its last step's scores are cosines to them
    cos = torch.nn.functional.normalize(refined_query, dim=-1) @ torch.nn.functional.normalize(
        refined_support.mean(2), dim=-1
    ).transpose(1, 2)
    torch.testing.assert_close(model.scale_cls * cos, model(support, query), atol=1e-5, rtol=1e-5)
    one = slice(0, 1)  # TIM's 1,000 steps: one episode is enough to check the wiring
    composed = COMPOSED_METHODS["ssr+tim"].score(model.refine_episode, support[one], query[one], None)
    torch.testing.assert_close(composed, tim_gd(refined_support[one], refined_query[one]))
    assert not torch.allclose(composed, tim_gd(support[one], query[one]), atol=1e-3)
    composed_pt = COMPOSED_METHODS["ssr+pt-map"].score(model.refine_episode, support, query, None)
    torch.testing.assert_close(composed_pt, pt_map(refined_support, refined_query))
    assert not torch.allclose(composed_pt, pt_map(support, query), atol=1e-3)

    two_shot = sample_episodes(split, 2, 3, 2, 5, seed=1)
    s2, q2, _ = gather(split, two_shot)
    r2, rq2 = model.refine_episode(s2, q2)
    moved = r2 - s2  # every support of a class moved by the same vector: its prototype's refinement
    torch.testing.assert_close(moved[:, :, 0], moved[:, :, 1])
    protos = model._refine(s2, q2, keep_graph=False)[-1][0]
    torch.testing.assert_close(r2.mean(2), protos, atol=1e-6, rtol=1e-6)

    # in the evaluator: the composed row equals PT-MAP on those features, accuracy by hand (ssr+tim
    # runs the same code path; its CPU peak-memory profile of 1,000 TIM steps takes a minute)
    ev = FewShotEvaluator(str(synthetic_features), "test", _model(tmp_path), threads=1)
    res = ev.evaluate(eps, peers=["pt-map", "ssr+pt-map"])
    by_hand = (pt_map(refined_support, refined_query).argmax(-1) == labels).float().mean(-1).numpy()
    np.testing.assert_allclose(res.peers["ssr+pt-map"], by_hand)
    assert res.cost["ssr+pt-map"].seconds > 0 and res.cost["ssr+pt-map"].n_episodes == 3
    assert res.cost["ssr+pt-map"].peak_episodes == 3  # a peak measured, as for the other rows
    assert "ssr+tim" not in ev.evaluate(eps, with_ssr=False, peers=["ssr+tim"]).peers  # no SSR, no composition


def test_registry_keeps_kinds_apart(tmp_path):
    """A Dirichlet-trained version never displaces a balanced champion, even under one name."""
    tracker = Tracker("kinds", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = _model(tmp_path).build()

    tags = {"dataset": "glyphs", "backbone": "conv4-64"}
    with tracker.run("a"):
        v1 = tracker.log_and_register(FewShotClassifier(model), "m", {**tags, "query_balance": "balanced"}, 50.0)
        v2 = tracker.log_and_register(FewShotClassifier(model), "m", {**tags, "query_balance": "dirichlet:2"}, 90.0)
        v3 = tracker.log_and_register(FewShotClassifier(model), "m", tags, 60.0)  # no tag: balanced (older versions)
    assert set(v1.aliases) == {"champion", "champion-glyphs-conv4-64"} and v2.aliases == ()
    assert set(v3.aliases) == {"champion", "champion-glyphs-conv4-64"}


def test_variants_are_scored_beside_the_model_and_compositions_read_the_one_named(synthetic_features, tmp_path):
    """Two SSR models on the same episodes (trained balanced / Dirichlet in a run): each has its
    accuracies and cost; ``compose_with`` picks whose refined features PT-MAP reads (by hand)."""
    split = load_split(synthetic_features, "test")
    primary = _model(tmp_path)
    (tmp_path / "other").mkdir()
    other = _model(tmp_path / "other", lr_dni=0.5)
    ev = FewShotEvaluator(str(synthetic_features), "test", primary, threads=1, variants=[("dirichlet:2", other)])
    eps = sample_dirichlet_episodes(split, 3, 3, 1, 15, alpha=2.0, seed=7)
    res = ev.evaluate(eps, peers=["ssr+pt-map"], compose_with="dirichlet:2")
    assert len(res.ssr_variants["dirichlet:2"]) == 3 and set(res.cost) >= {"ssr", "ssr:dirichlet:2", "ssr+pt-map"}
    s, q, labels = gather(split, eps)
    for name, model in (("dirichlet:2", other), ("", primary)):
        rs, rq = model.build().refine_episode(s, q)
        by_hand = (pt_map(rs, rq).argmax(-1) == labels).float().mean(-1).numpy()
        got = ev.evaluate(eps, peers=["ssr+pt-map"], compose_with=name).peers["ssr+pt-map"]
        np.testing.assert_allclose(got, by_hand)
    scores = ShotResult(
        1,
        tuple(res.baseline.tolist()),
        tuple(res.baseline.tolist()),
        tuple(tuple(a.tolist()) for a in res.ssr_by_step),
        (("ssr+pt-map", tuple(res.peers["ssr+pt-map"].tolist())),),
        (),
        "dirichlet:2",
        0.0,
        (("dirichlet:2", tuple(tuple(a.tolist()) for a in res.ssr_variants["dirichlet:2"])),),
    )
    assert {"ssr_step2", "ssr_dirichlet2_step2", "ssr_pt_map"} <= set(scores.accuracies())
    rows = reporting.fewshot_rows(
        {1: scores.accuracies()},
        "k",
        2,
        ["baseline", "ssr", "ssr+pt-map"],
        ssr_rows=[
            ("SSR (trained balanced)", "ssr_step2", "ssr"),
            ("SSR (trained Dirichlet)", "ssr_dirichlet2_step2", ""),
        ],
    )
    assert [r["method"] for r in rows] == [
        "Baseline (cosine to prototypes)",
        "SSR (trained balanced)",
        "SSR (trained Dirichlet)",
        COMPOSED_METHODS["ssr+pt-map"].label,
    ]
