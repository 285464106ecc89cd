"""Every retrieval Prefect task's ``.fn`` on the small built-in glyph set, in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssr_model.baselines import KReciprocalPoint
from ssr_tasks.backbone import get_backbone
from ssr_tasks.handoffs import Trials
from ssr_tasks.retrieval import report, tasks
from ssr_tasks.retrieval.evaluate import read_ranks
from ssr_tasks.retrieval.handoffs import Rankings, Reranked, RetrievalData, RetrievalFeatures
from storage.simstore import SimilarityStore

METHODS = [
    "features",
    "AQE",
    "AQEwD",
    "alpha-QE",
    "DQE",
    "k-reciprocal",
    "alpha-DBA-QE",
    "diffusion",
    "GNN",
    "SuperGlobal",
]


@pytest.fixture
def data(task_env, tiny_retrieval_params, glyphs_small, ssr_home):
    return tasks.prepare_data.fn(tiny_retrieval_params.data, str(ssr_home))


@pytest.fixture
def features(data, tiny_retrieval_params, pipeline_dir):
    p = tiny_retrieval_params
    backbone = get_backbone.fn(
        p.backbone, p.data.entry.spec, p.train.seed, data.fewshot_root, str(pipeline_dir / "backbones"), p.device
    )
    return tasks.extract_features.fn(p.data, p.k_max, data, backbone, str(pipeline_dir), p.device)


def rank(p, features, work_dir):
    """``rank_methods`` called as the flow calls it."""
    return tasks.rank_methods.fn(p.baselines, p.train, p.k_max, p.evaluation.shard_size, features, str(work_dir))


def test_prepare_data_names_ground_truth_and_images(data, glyphs_small):
    assert isinstance(data, RetrievalData) and data.fewshot_root == glyphs_small["fewshot_root"]
    assert data.gnd.endswith("test/gnd_glyphs-retrieval.pkl") and data.images.endswith("test/jpg")


def test_extract_features_writes_database_query_and_train_splits(features, glyphs_small):
    assert isinstance(features, RetrievalFeatures) and features.dim == 256
    assert (features.n_database, features.n_queries) == (
        glyphs_small["n_retrieval"]["database"],
        glyphs_small["n_retrieval"]["queries"],
    )


def test_k_larger_than_the_database_is_refused_before_training(data, tiny_retrieval_params, pipeline_dir):
    from ssr_tasks.handoffs import Backbone

    with pytest.raises(ValueError, match=r"k: 100000 is larger than the database \(500 images\)"):
        tasks.extract_features.fn(
            tiny_retrieval_params.data, 100_000, data, Backbone("x", "conv4-64", "glyphs"), str(pipeline_dir)
        )


def test_rank_methods_writes_a_store_and_query_table_per_method(features, tiny_retrieval_params, pipeline_dir):
    rankings = rank(tiny_retrieval_params, features, pipeline_dir)
    assert isinstance(rankings, Rankings) and [m.name for m in rankings.methods] == METHODS
    ranks = read_ranks(rankings.ranks, "features")  # memory-mapped int32, one file per method
    assert ranks.shape == (features.n_queries, features.n_database) and ranks.dtype == np.int32
    db = np.load(rankings.database, mmap_mode="r")  # the re-rankers' database: unit rows, memory-mapped
    assert db.shape == (features.n_database, features.dim)
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    # every row's cost was measured on the pipeline's own call, and each row starts from the initial ranking
    costs = {c.name: c for c in rankings.costs}
    assert list(costs) == METHODS and all(c.n_queries == features.n_queries for c in costs.values())
    assert all(c.ms_per_query > 0 and c.cpu_seconds >= 0 and c.peak_mib > 0 for c in costs.values())
    assert all(c.ms_per_query >= costs["features"].ms_per_query for c in costs.values())
    assert rankings.choice.n_for("AQE") in (1, 3) and rankings.choice.krecip == KReciprocalPoint(10, 5, 0.3)
    for m in rankings.methods:
        store = SimilarityStore(m.topk)
        assert store.is_complete() and store.k == 100 and store.n_queries == features.n_queries


def test_features_of_another_glyph_rendering_get_their_own_table(features, data, tiny_retrieval_params, pipeline_dir):
    # glyphs of any seed are rendered into the same folder: the paths in `data` alone would reuse this table
    p = tiny_retrieval_params
    other = p.data.model_copy(update={"data_seed": 1})
    backbone = get_backbone.fn(
        p.backbone, p.data.entry.spec, p.train.seed, data.fewshot_root, str(pipeline_dir / "backbones")
    )  # the one `features` used
    again = tasks.extract_features.fn(other, p.k_max, data, backbone, str(pipeline_dir))
    assert again.path != features.path and Path(again.path).exists()


def test_stores_of_another_shard_size_are_written_apart(features, tiny_retrieval_params, pipeline_dir):
    p = tiny_retrieval_params
    first = rank(p, features, pipeline_dir)
    second = tasks.rank_methods.fn(p.baselines, p.train, p.k_max, 7, features, str(pipeline_dir))
    assert Path(first.database).parent != Path(second.database).parent
    for rankings, shard_size in ((first, 16), (second, 7)):
        store = SimilarityStore(rankings.methods[0].topk)
        assert store.is_complete() and store.manifest["shard_size"] == shard_size


def test_train_rerank_and_report(features, data, tiny_retrieval_params, pipeline_dir, ray_local):
    p = tiny_retrieval_params
    trials = tasks.train_ssr.fn(p.train, p.sweep, features, str(pipeline_dir), device=p.device)
    assert isinstance(trials, Trials) and [t.lr_dni for t in trials.trials] == p.sweep["lr_dni"]
    best = trials.best
    assert best.label == "lr_dni=0.001" and best.feat_dim == features.dim
    assert best.history[0].iteration == 0 and best.model.build().k == p.train.k
    assert best.best_iteration in [h.iteration for h in best.history]

    rankings = rank(p, features, pipeline_dir)
    reranked = [tasks.rerank.fn(p.evaluation, rankings, m, best.model, p.device) for m in rankings.methods[:2]]
    for r, m in zip(reranked, rankings.methods):
        assert isinstance(r, Reranked) and r.name == m.name and SimilarityStore(r.store).is_complete()

    out = report.write_report.fn(p, data, rankings, reranked, str(pipeline_dir / "results"))
    assert [r["method"] for r in out.rows] == ["features", "features + SSR", "AQE", "AQE + SSR"]
    for row in out.rows:
        assert all(0.0 <= row[f"mAP {k}"] <= 100.0 for k in ("easy", "medium", "hard"))
    assert {name for name, _ in out.figures} == {"map_by_method.png", "reranked_example.png", "map_vs_cost.png"}
    # costs (issue 20 item 1): measured in actors, a "+ SSR" row costs its method's call plus SSR's
    cost = {c.name: c for c in rankings.costs}
    assert [c.name for c in rankings.costs] == METHODS and not reranked[1].ssr_costs  # the first task measures all
    ssr_cost = {c.name: c for c in reranked[0].ssr_costs}
    assert list(ssr_cost) == [f"{m} + SSR" for m in METHODS]
    rows = {r["method"]: r for r in out.rows}
    peak = f"peak MiB (Q={features.n_queries})"
    for name in ("features", "AQE"):
        ssr = ssr_cost[f"{name} + SSR"]
        assert rows[name]["ms/query"] == float(f"{cost[name].ms_per_query:.3g}") > 0
        both = cost[name].ms_per_query + ssr.ms_per_query
        assert rows[f"{name} + SSR"]["ms/query"] == float(f"{both:.3g}")
        assert rows[f"{name} + SSR"][peak] == report.reporting.fmt_peak_mib(max(cost[name].peak_mib, ssr.peak_mib))
        assert rows[name][peak] == "< 1 MiB" or float(rows[name][peak].replace(",", "")) >= 1
    assert cost["k-reciprocal"].peak_mib > 1  # it builds (Q + N) x (Q + N) distances: measurable
    # every grid point's validation and test mAP beside results.csv, the chosen points marked
    table = Path(out.csv).parent / "val_vs_test.csv"
    vvt = report.read_val_vs_test(table)
    assert {r["method"] for r in vvt} == set(METHODS) - {"features"}
    chosen = {(r["method"], r["test setting"]) for r in vvt if r["chosen on validation"]}
    assert ("k-reciprocal", rankings.choice.krecip.label()) in chosen
    assert table.with_suffix(".md").is_file() and (Path(out.csv).parent / "costs.csv").is_file()
