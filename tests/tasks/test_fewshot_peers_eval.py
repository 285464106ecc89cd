"""Peer methods, their costs and imbalanced (Dirichlet) queries in the few-shot evaluation (plain code, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssr_model.baselines import PEER_METHODS
from ssr_tasks import reporting
from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot.episodes import (
    EpisodeIndices,
    dirichlet_counts,
    gather,
    load_split,
    repeated_query_fraction,
    sample_dirichlet_episodes,
    sample_episodes,
)
from ssr_tasks.fewshot.evaluate import EpisodeScores, FewShotEvaluator, MethodCost, peak_bytes_of_call
from ssr_tasks.fewshot.handoffs import MethodCostRow, ShotResult


def test_dirichlet_counts_sum_exactly_and_follow_the_draw():
    rng = np.random.default_rng(0)
    counts = np.stack([dirichlet_counts(2.0, 5, 75, rng) for _ in range(400)])
    assert (counts.sum(1) == 75).all() and (counts >= 0).all()
    assert counts.std(1).mean() > 5  # Dirichlet(2) over 5 classes: far from 15 each
    flat = np.stack([dirichlet_counts(1e4, 5, 75, rng) for _ in range(50)])
    assert np.abs(flat - 15).max() <= 2  # a huge alpha is nearly balanced
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_counts(0.0, 5, 75, rng)


def test_dirichlet_episodes_carry_their_labels(synthetic_features):
    test = load_split(synthetic_features, "test")  # 6 classes of 20 rows
    eps = sample_dirichlet_episodes(test, 12, 3, 2, 15, alpha=2.0, seed=1)
    again = sample_dirichlet_episodes(test, 12, 3, 2, 15, alpha=2.0, seed=1)
    np.testing.assert_array_equal(eps.query, again.query)
    assert eps.support.shape == (12, 3, 2) and eps.query.shape == eps.query_labels.shape == (12, 15)
    for e in range(12):
        classes = test.labels[eps.support[e, :, 0]]
        assert (test.labels[eps.query[e]] == classes[eps.query_labels[e]]).all()  # labels index the support classes
        assert not set(eps.support[e].ravel()) & set(eps.query[e])
    assert len({tuple(np.bincount(lab, minlength=3)) for lab in eps.query_labels}) > 3
    support, query, labels = gather(test, eps.chunk(0, 4))
    assert support.shape == (4, 3, 2, 16) and query.shape == (4, 15, 16)
    torch.testing.assert_close(labels, torch.from_numpy(eps.query_labels[:4]))
    # 18 rows per class after 2 shots: 40 queries over 3 classes need repeats in some episodes
    crowded = sample_dirichlet_episodes(test, 20, 3, 2, 40, alpha=0.5, seed=0)
    assert 0 < repeated_query_fraction(crowded) < 0.5
    assert repeated_query_fraction(sample_episodes(test, 5, 3, 2, 4, seed=0)) == 0.0


def test_dirichlet_episodes_save_and_load(synthetic_features, tmp_path):
    eps = sample_dirichlet_episodes(load_split(synthetic_features, "test"), 3, 3, 1, 9, alpha=2.0, seed=0)
    back = EpisodeIndices.load(eps.save(tmp_path / "eps.npz"))
    np.testing.assert_array_equal(back.query_labels, eps.query_labels)
    assert (
        EpisodeIndices.load(
            sample_episodes(load_split(synthetic_features, "test"), 2, 3, 1, 2, 0).save(tmp_path / "b.npz")
        ).query_labels
        is None
    )


@pytest.mark.parametrize("balance", ["balanced", "dirichlet"])
def test_evaluator_scores_every_peer_with_its_cost(synthetic_features, balance):
    test = load_split(synthetic_features, "test")
    if balance == "balanced":
        eps = sample_episodes(test, 6, 3, 1, 5, seed=0)
    else:
        eps = sample_dirichlet_episodes(test, 6, 3, 1, 15, alpha=2.0, seed=0)
    ev = FewShotEvaluator(str(synthetic_features), "test", None, threads=1)
    chunks = [
        ev.evaluate(eps.chunk(0, 3), peers=list(PEER_METHODS)),
        ev.evaluate(eps.chunk(3, 6), peers=list(PEER_METHODS)),
    ]
    res = EpisodeScores.merge(chunks)
    assert list(res.peers) == list(PEER_METHODS)
    for name, accs in res.peers.items():
        assert accs.shape == (6,) and ((0 <= accs) & (accs <= 1)).all(), name
        assert accs.mean() > 1 / 3, name  # better than chance on separated clusters
    assert set(res.cost) == {"baseline", *PEER_METHODS}
    tim = res.cost["tim"]
    assert tim.n_episodes == 6 and tim.seconds == pytest.approx(
        chunks[0].cost["tim"].seconds + chunks[1].cost["tim"].seconds
    )
    assert tim.cpu_ms_per_episode > res.cost["simpleshot"].cpu_ms_per_episode  # 1,000 Adam steps against one product
    # CPU: the peak of one call on 3 episodes, measured once per method (the second chunk is not larger)
    assert all(c.peak_episodes == 3 and c.peak_bytes >= 0 for c in res.cost.values()), res.cost
    assert all(math.isnan(c.cost[m].peak_bytes) for c in chunks[1:] for m in c.cost)
    torch.testing.assert_close(
        ev.base_mean(), torch.from_numpy(load_split(synthetic_features, "train").embeddings.mean(0))
    )


def test_evaluator_names_a_method_that_cannot_run(synthetic_features):
    eps = sample_episodes(load_split(synthetic_features, "test"), 2, 3, 1, 1, seed=0)  # 3 queries per episode
    ev = FewShotEvaluator(str(synthetic_features), "test", None)
    with pytest.raises(ValueError, match="laplacianshot: needs at least 4 queries per episode, got 3"):
        ev.evaluate(eps, peers=["laplacianshot"])
    with pytest.raises(ValueError, match="unknown few-shot method 'timm'"):
        ev.evaluate(eps, peers=["timm"])


def test_params_refuse_bad_methods_and_alpha_naming_them():
    assert FewShotParams().evaluation.methods[:3] == ["baseline", "k-reciprocal", "ssr"]
    assert set(PEER_METHODS) <= set(FewShotParams().evaluation.methods)
    assert FewShotParams(evaluation={"query_balance": "dirichlet:2"}).evaluation.dirichlet_alpha == 2.0
    assert FewShotParams().evaluation.dirichlet_alpha is None
    with pytest.raises(ValueError, match="methods: unknown method 'pt_map'"):
        FewShotParams(evaluation={"methods": ["ssr", "pt_map"]})
    for bad in ("dirichlet:0", "dirichlet:-1", "dirichlet:inf"):
        with pytest.raises(ValueError, match="Dirichlet alpha must be a finite number > 0"):
            FewShotParams(evaluation={"query_balance": bad})
    with pytest.raises(ValueError, match="expected 'balanced' or 'dirichlet:ALPHA'"):
        FewShotParams(evaluation={"query_balance": "imbalanced"})
    with pytest.raises(
        ValueError,
        match=r"evaluation.methods: laplacianshot: needs at least 4 queries per episode, got 2 "
        r"\(2-way 1-shot",
    ):
        FewShotParams(train={"n_way": 2, "n_query": 1}, evaluation={"methods": ["ssr", "laplacianshot"]})
    FewShotParams(train={"n_way": 2, "n_query": 1}, evaluation={"methods": ["ssr", "tim"]})


def test_rows_carry_cost_and_queries_columns_and_the_cost_plot():
    accs = {
        1: {
            "baseline": np.array([0.5, 0.7]),
            "krecip": np.array([0.6, 0.6]),
            "ssr_step2": np.array([0.8, 0.9]),
            "tim": np.array([0.9, 0.9]),
        }
    }
    costs = {1: {"baseline": (0.012, 0.0), "krecip": (3.1, 0.2), "ssr": (4.0, 25.25), "tim": (120.0, 0.4)}}
    rows = reporting.fewshot_rows(
        accs, "k1=20, k2=6, λ=0.3", 2, ["baseline", "ssr", "tim"], costs, "dirichlet:2", cost_episodes=50
    )
    assert [r["method"] for r in rows] == [
        "Baseline (cosine to prototypes)",
        "SSR (steps=2)",
        PEER_METHODS["tim"].label,
    ]
    assert rows[2] == {
        "method": PEER_METHODS["tim"].label,
        "queries": "Dirichlet α=2",
        "1-shot acc (%)": "90.00 ± 0.00",
        "1-shot ms/episode": "120",
        "1-shot peak MiB (E=50)": "< 1 MiB",
    }
    assert [r["1-shot peak MiB (E=50)"] for r in rows] == ["< 1 MiB", "25.2", "< 1 MiB"]  # nothing measurable is not 0
    assert [reporting.fmt_peak_mib(m) for m in (float("nan"), 0.999, 1.0, 1234.4)] == ["n/a", "< 1 MiB", "1", "1,234"]
    fig = reporting.plot_accuracy_vs_cost(
        [("SSR", 1, accs[1]["ssr_step2"], 4.0), ("TIM", 1, accs[1]["tim"], 120.0)], "t"
    )
    assert fig.axes[0].get_xscale() == "log"
    reporting._plt().close(fig)


def test_shot_result_keys_peers_and_costs_like_metrics():
    res = ShotResult(
        1,
        (1.0,),
        (0.5,),
        ((0.2,), (0.6,)),
        (("bd-cspn", (0.7,)),),
        (MethodCostRow("bd_cspn", 2.0, 0.1),),
        "dirichlet:2",
        0.1,
    )
    assert list(res.accuracies()) == ["baseline", "krecip", "ssr_step0", "ssr_step1", "bd_cspn"]
    assert res.costs()["bd_cspn"].ms_per_episode == 2.0
    # the peak of the largest measured call, not the highest peak of a smaller one; unmeasured calls (NaN) do not count
    merged = MethodCost.merge(
        [MethodCost(1.0, 2, 10.0, 0.5, 2), MethodCost(3.0, 4, 4.0, 1.5, 4), MethodCost(1.0, 4, math.nan, 1.0)]
    )
    assert merged == MethodCost(5.0, 10, 4.0, 3.0, 4)
    assert math.isnan(MethodCost.merge([MethodCost(1.0, 2, math.nan, 0.5)]).peak_bytes)
    assert MethodCost(1.0, 4, 0.0, 0.5).cpu_ms_per_episode == 125.0
    assert (
        MethodCost(1.0, 50, 3 * 2**20, 0.5, 50).peak_mib
        == MethodCost(1.0, 50, 3 * 2**20, 0.5, 50).peak_mib_per_episode
        == 3.0
    )


def test_peak_of_a_call_counts_torch_and_numpy_allocations_even_where_memory_is_reused():
    # the old measure (peak RSS growth) read 0 here: a 64 MiB block freed just before is reused
    big = torch.ones(16 * 2**20)
    del big

    def torch_call() -> float:
        scratch = torch.ones(8 * 2**20)  # 32 MiB live at the peak, freed before returning
        return float(scratch.sum())

    def numpy_call() -> float:
        return float(np.ones(4 * 2**20).sum())  # 32 MiB of float64

    cpu = torch.device("cpu")
    assert peak_bytes_of_call(torch_call, cpu) / 2**20 == pytest.approx(32, abs=1)
    assert peak_bytes_of_call(numpy_call, cpu) / 2**20 == pytest.approx(32, abs=1)
    assert peak_bytes_of_call(lambda: None, cpu) < 2**20  # shown as "< 1 MiB"


def test_ssr_scores_dirichlet_episodes_with_its_fixed_query_count(synthetic_features, tmp_path):
    from ssr_tasks.config import FewShotTrainParams
    from ssr_tasks.fewshot.handoffs import FewShotModel

    cfg = FewShotTrainParams(n_way=3, n_query=5, hidden=8)  # 15 queries per episode in all
    torch.manual_seed(0)
    torch.save(cfg.build(16, 2).state_dict(), tmp_path / "ssr.pt")
    ev = FewShotEvaluator(
        str(synthetic_features), "test", FewShotModel(str(tmp_path / "ssr.pt"), cfg, 16, 2), threads=1
    )
    eps = sample_dirichlet_episodes(ev.split, 4, 3, 1, 15, alpha=2.0, seed=3)
    res = ev.evaluate(eps, peers=["pt-map"])
    assert len(res.ssr_by_step) == 3 and all(a.shape == (4,) for a in res.ssr_by_step)
    np.testing.assert_allclose(res.ssr_by_step[0], res.baseline, atol=1e-6)  # step 0: cosine to prototypes
    assert res.cost["ssr"].n_episodes == 4 and res.cost["ssr"].seconds > 0
