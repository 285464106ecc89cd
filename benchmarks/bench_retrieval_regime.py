"""When does retrieval SSR learn on a small labelled data set? (issue 19, item 8)

A seeded generator makes labelled embeddings with the statistics of the data set in the
issue (235 training classes of 10-20 items, D = 256, weak features at ~25% mAP on separate
test classes); the project's own training code (``ssr_tasks.retrieval.train``) trains
retrieval SSR on it under the demo settings and under settings chosen by the rules below.
For every run the table shows the test mAP of the initial ranking, the test mAP of the
checkpoint that validation chose, the iteration it chose, and (as an oracle that a real run
cannot see) the best test mAP of any validated checkpoint.

Rules that choose settings from the data (plain functions here; to be moved into the product):

* :func:`scaled_lr_dni`         lr_dni grid from the features (first update ~ top-k spread)
* :func:`holdout_fraction_for_k` held-out fraction large enough for k and n_val_queries
* :func:`relaxed_sequence_filter` sequence_length / min_positives so that sequences pass
* patience (``--patience``): stop after P validation periods without improvement

    python benchmarks/bench_retrieval_regime.py            # full table (~25 min on 2 CPU cores)
    python benchmarks/bench_retrieval_regime.py --quick    # ~2 CPU-minutes (under 3 minutes on idle cores)

Findings and the rules' derivation: docs/own-data-ssr.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssr_model import RetrievalSSR  # noqa: E402
from ssr_model.metrics import revisited_map  # noqa: E402
from ssr_tasks.retrieval import train as rt  # noqa: E402
from ssr_tasks.retrieval.settings import (  # noqa: E402
    first_update_slope,
    holdout_fraction_for_k,
    relaxed_sequence_filter,
    scaled_lr_dni,
    sequence_pass_stats,
)
from storage.landmark_tables import holdout_clusters  # noqa: E402

D = 256


# --------------------------------------------------------------------------------------------
# synthetic labelled embeddings
# --------------------------------------------------------------------------------------------


def make_classes(
    rng: np.random.Generator,
    n_classes: int,
    sigma: float,
    dim: int = D,
    min_items: int = 10,
    max_items: int = 20,
    first_label: int = 0,
    nuisance: float = 0.0,
    n_contexts: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_classes`` classes of ``min_items..max_items`` items; rows L2-normalised.

    An item is its class centre (uniform on the unit sphere) plus ``nuisance`` times one of
    ``n_contexts`` shared context directions (drawn once per call from a generator seeded
    by ``n_contexts`` and ``dim``, so train and test share them, as backgrounds, lighting or
    viewpoints are shared by the classes of a real data set) plus isotropic Gaussian noise of
    total norm ~``sigma``. ``nuisance = 0``: neighbours of neighbours are mostly the class
    again (the regime where query expansion and SSR help); ``nuisance ~ 1``: an item's
    nearest neighbours are as often other classes in the same context.
    Returns (embeddings (N, dim) float32, labels (N,) int64)."""
    sizes = rng.integers(min_items, max_items + 1, n_classes)
    centres = rng.standard_normal((n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), sizes)
    x = centres[labels] + sigma * rng.standard_normal((len(labels), dim)) / math.sqrt(dim)
    if nuisance > 0:
        ctx = np.random.default_rng(n_contexts * 1009 + dim).standard_normal((n_contexts, dim))
        ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
        x += nuisance * ctx[rng.integers(0, n_contexts, len(labels))]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), (labels + first_label).astype(np.int64)


def initial_map(emb: np.ndarray, labels: np.ndarray, n_queries: int, seed: int) -> float:
    """Medium-protocol mAP (fraction) of the plain ranking of a revisited-format set built from
    labelled rows exactly as the project builds its validation set."""
    s = rt.ValidationSet.from_clusters(emb, labels, n_queries, seed)
    return revisited_map(s.initial, s.gnd)["medium"]["map"] / 100.0


def calibrate_sigma(
    target_map: float,
    n_test_classes: int,
    n_test_queries: int,
    seed: int,
    dim: int = D,
    repeats: int = 3,
    nuisance: float = 0.0,
) -> float:
    """The noise level giving ``target_map`` on test sets of ``n_test_classes`` classes
    (bisection; mAP falls monotonically with sigma)."""
    lo, hi = 0.02, 6.0
    for _ in range(16):
        mid = (lo + hi) / 2
        m = np.mean(
            [
                initial_map(
                    *make_classes(
                        np.random.default_rng(10_000 + seed * 7 + r), n_test_classes, mid, dim, nuisance=nuisance
                    ),
                    n_test_queries,
                    seed,
                )
                for r in range(repeats)
            ]
        )
        lo, hi = (mid, hi) if m > target_map else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Synthetic:
    """train rows (all 235 classes, held-out split applied later), test rows (other classes)."""

    train_emb: np.ndarray
    train_labels: np.ndarray
    test_emb: np.ndarray
    test_labels: np.ndarray
    sigma: float
    seed: int
    nuisance: float = 0.0


def synthetic_dataset(
    seed: int = 0,
    n_train_classes: int = 235,
    n_test_classes: int = 100,
    target_map: float = 0.25,
    n_test_queries: int = 100,
    sigma: float | None = None,
    nuisance: float = 0.0,
) -> Synthetic:
    """Seeded data set: ``n_train_classes`` training classes and ``n_test_classes`` disjoint test
    classes (10-20 items each, D = 256); the noise is calibrated so that the test set's initial
    medium mAP is ~``target_map``."""
    if sigma is None:
        sigma = calibrate_sigma(target_map, n_test_classes, n_test_queries, seed, nuisance=nuisance)
    rng = np.random.default_rng(seed)
    tr, trl = make_classes(rng, n_train_classes, sigma, nuisance=nuisance)
    te, tel = make_classes(rng, n_test_classes, sigma, first_label=100_000, nuisance=nuisance)
    return Synthetic(tr, trl, te, tel, sigma, seed, nuisance)


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# training with the project's code
# --------------------------------------------------------------------------------------------


def config_class() -> type:
    """The retrieval training config class, wherever the refactor has put it: the dataclass
    ``RetrievalTrainConfig`` (feat_dim a field) or the pydantic ``RetrievalTrainParams``
    (same field names, feat_dim passed to ``build``)."""
    for name in ("RetrievalTrainParams", "RetrievalTrainConfig"):
        if hasattr(rt, name):
            return getattr(rt, name)
    from ssr_tasks import config as task_config  # noqa: PLC0415

    return task_config.RetrievalTrainParams


def _config_fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    fields = getattr(cls, "model_fields", None)  # pydantic
    if fields is not None:
        return set(fields)
    return set(inspect.signature(cls).parameters)


def make_config(**kw) -> object:
    """A training config from the keyword arguments its class has (feat_dim may have moved out)."""
    cls = config_class()
    names = _config_fields(cls)
    return cls(**{k: v for k, v in kw.items() if k in names})


def build_model(cfg, feat_dim: int = D) -> RetrievalSSR:
    """``cfg.build()`` or ``cfg.build(feat_dim)``, whichever the config class has."""
    return cfg.build(feat_dim) if inspect.signature(cfg.build).parameters else cfg.build()


class _Stop(Exception):
    pass


@dataclass
class Setting:
    name: str
    k: int = 50
    hidden: int = 256
    lr_dni: float = 1e-3
    sequence_length: int = 1000
    min_positives: int = 2
    max_ap: float = 0.8
    iterations: int = 600
    val_every: int = 250
    batch_queries: int = 16
    lr: float = 1e-3
    holdout: float = 0.05
    n_val_queries: int = 70
    patience: int | None = None
    scale: float = 1.0  # rows multiplied by this and fed unnormalised (feature-norm experiment)
    seed: int = 0


@dataclass
class Result:
    setting: Setting
    test_before: float
    test_after: float
    chosen_iteration: int
    stopped_at: int
    val_before: float
    val_best: float
    oracle_test: float
    oracle_iteration: int
    n_val_items: int
    n_val_classes: int
    seconds: float
    best_state: dict | None = None


def train_once(data: Synthetic, s: Setting, n_test_queries: int = 100, work: Path | None = None) -> Result:
    """Train with ``rt.train_retrieval`` on the training classes minus a hash hold-out of
    ``s.holdout`` of them (validation), score every validated checkpoint on the test classes."""
    t0 = time.time()
    held = holdout_clusters(data.train_labels, s.holdout, seed=s.seed)
    emb_tr, lab_tr = data.train_emb[~held] * s.scale, data.train_labels[~held]
    emb_va, lab_va = data.train_emb[held] * s.scale, data.train_labels[held]
    val = rt.ValidationSet.from_clusters(emb_va, lab_va, s.n_val_queries, s.seed)
    test = rt.ValidationSet.from_clusters(data.test_emb * s.scale, data.test_labels, n_test_queries, s.seed)
    cfg = make_config(
        feat_dim=D,
        k=s.k,
        steps=1,
        hidden=s.hidden,
        lr_dni=s.lr_dni,
        sequence_length=s.sequence_length,
        min_positives=s.min_positives,
        max_ap=s.max_ap,
        iterations=s.iterations,
        val_every=s.val_every,
        batch_queries=s.batch_queries,
        lr=s.lr,
        n_val_queries=s.n_val_queries,
        seed=s.seed,
    )
    points: list[tuple[float, float]] = []  # (validation mAP, test mAP) at every validation point
    original = rt.validation_map

    def spy(model, vset, device):  # also scores the test set at every validation point (oracle column)
        v = original(model, vset, device)
        if vset is val:
            points.append((v, original(model, test, device)))
        return v

    iterations = [0]  # the untrained model is validated first, before any report

    def report(row: dict) -> None:
        iterations.append(row["iteration"])
        vals = [p[0] for p in points]
        since_best = len(vals) - 1 - int(np.argmax(vals))
        if s.patience is not None and since_best >= s.patience:
            raise _Stop

    kwargs = {"device": "cpu", "report": report}
    if "feat_dim" in inspect.signature(rt.train_retrieval).parameters:
        kwargs["feat_dim"] = D
    rt.validation_map = spy
    try:
        with tempfile.TemporaryDirectory(dir=work) as out:
            try:
                rt.train_retrieval(cfg, emb_tr, lab_tr, val, Path(out), **kwargs)
            except _Stop:
                pass
            state = torch.load(Path(out) / "best.pt", map_location="cpu", weights_only=True)
    finally:
        rt.validation_map = original
    vals = [p[0] for p in points]
    chosen = max(range(len(vals)), key=lambda i: (vals[i], -iterations[i]))  # as train_retrieval chooses
    oracle = max(range(len(vals)), key=lambda i: (points[i][1], -iterations[i]))
    test_before = revisited_map(test.initial, test.gnd)["medium"]["map"] / 100.0
    return Result(
        s,
        test_before,
        points[chosen][1],
        iterations[chosen],
        iterations[-1],
        vals[0],
        vals[chosen],
        points[oracle][1],
        iterations[oracle],
        int(held.sum()),
        len(np.unique(lab_va)),
        time.time() - t0,
        state,
    )


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def validation_noise(
    data: Synthetic,
    model_state: dict | None,
    s: Setting,
    fractions: Sequence[float],
    repeats: int,
    n_train_classes: int = 235,
) -> list[dict]:
    """Validation sets the size of a hold-out of each fraction of ``n_train_classes``, drawn
    fresh from the same distribution ``repeats`` times: mean and std of the initial validation
    mAP and, when a trained model is given, of its gain over the untrained model."""
    out = []
    untrained = build_model(make_config(feat_dim=D, k=s.k, hidden=s.hidden, lr_dni=s.lr_dni, seed=s.seed))
    trained = None
    if model_state is not None:
        trained = build_model(make_config(feat_dim=D, k=s.k, hidden=s.hidden, lr_dni=s.lr_dni, seed=s.seed))
        trained.load_state_dict(model_state)
    for f in fractions:
        n_cls = max(2, round(f * n_train_classes))
        init, gain = [], []
        for r in range(repeats):
            emb, lab = make_classes(
                np.random.default_rng(50_000 + 97 * r + int(1000 * f)), n_cls, data.sigma, nuisance=data.nuisance
            )
            v = rt.ValidationSet.from_clusters(emb, lab, s.n_val_queries, r)
            if v.initial.shape[1] < s.k:
                init.append(float("nan"))
                continue
            base = rt.validation_map(untrained, v, "cpu")
            init.append(revisited_map(v.initial, v.gnd)["medium"]["map"] / 100.0)
            if trained is not None:
                gain.append(rt.validation_map(trained, v, "cpu") - base)
        n_items = round(f * n_train_classes * 15)
        out.append(
            {
                "fraction": f,
                "classes": n_cls,
                "items~": n_items,
                "db~": n_items - min(s.n_val_queries, n_items),
                "val_map_mean": float(np.nanmean(init)),
                "val_map_std": float(np.nanstd(init)),
                "gain_mean": float(np.mean(gain)) if gain else float("nan"),
                "gain_std": float(np.std(gain)) if gain else float("nan"),
            }
        )
    return out


def fmt_table(results: list[Result]) -> str:
    head = (
        "| setting | lr_dni | k | hidden | L | min_pos | iters (stop) | holdout: classes/items | "
        "test mAP before | after | gain | chosen it | val before -> best | oracle test (it) | s |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in results:
        s = r.setting
        its = f"{s.iterations}" + (f" ({r.stopped_at})" if s.patience is not None else "")
        lines.append(
            f"| {s.name} | {s.lr_dni:.3g} | {s.k} | {s.hidden} | {s.sequence_length} | {s.min_positives} | {its} | "
            f"{r.n_val_classes}/{r.n_val_items} | {100 * r.test_before:.2f} | {100 * r.test_after:.2f} | "
            f"{100 * (r.test_after - r.test_before):+.2f} | {r.chosen_iteration} | "
            f"{100 * r.val_before:.2f} -> {100 * r.val_best:.2f} | {100 * r.oracle_test:.2f} ({r.oracle_iteration}) | "
            f"{r.seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few short runs (under 3 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--nuisance",
        type=float,
        default=0.0,
        help="weight of the shared context directions (0: isotropic noise, where SSR learns)",
    )
    ap.add_argument("--patience", type=int, default=4, help="validation periods without improvement before stopping")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise-repeats", type=int, default=10, help="fresh validation sets per hold-out size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    data = synthetic_dataset(args.seed, nuisance=args.nuisance)
    n_items = len(data.train_labels)
    _, sizes = np.unique(data.train_labels, return_counts=True)
    print(
        f"# data: {len(sizes)} training classes, {n_items} items, {len(np.unique(data.test_labels))} test classes "
        f"({len(data.test_labels)} items), D={D}, sigma={data.sigma:.3f}, nuisance={data.nuisance:g}"
    )

    # ---- sequences: how many positives, how many pass the filter
    held = holdout_clusters(data.train_labels, 0.05, seed=args.seed)
    emb_tr, lab_tr = data.train_emb[~held], data.train_labels[~held]
    print("\n## training sequences (k=50, max_ap=0.8)\n")
    print(
        "| sequence_length | min_positives | pass rate | positives in draw | positives in top-k (passing) | top-k AP (passing) |"
    )
    print("|---|---|---|---|---|---|")
    draws = 200 if args.quick else 600
    for L, mp in (
        [(1000, 2), (len(emb_tr) - 1, 2)]
        if args.quick
        else [(1000, 5), (1000, 2), (len(emb_tr) - 1, 5), (len(emb_tr) - 1, 2)]
    ):
        st = sequence_pass_stats(emb_tr, lab_tr, 50, L, mp, 0.8, n_draws=draws, seed=args.seed)
        print(
            f"| {st['sequence_length']} | {mp} | {st['pass_rate']:.2f} | {st['positives_in_draw']:.1f} | "
            f"{st['positives_in_topk']:.1f} | {st['topk_ap']:.2f} |"
        )

    # ---- lr_dni scale: first-update size per unit lr_dni vs the spread of top-k cosines
    print("\n## lr_dni scale: first update of the untrained model\n")
    print(
        "| feature norm | k | hidden | slope (|d cos| per unit lr_dni) | top-k cos spread | lr* = spread/slope | scaled_lr_dni grid |"
    )
    print("|---|---|---|---|---|---|---|")
    probes = (
        [(1.0, 50, 256), (20.0, 50, 256)]
        if args.quick
        else [(1.0, 20, 256), (1.0, 50, 256), (1.0, 100, 256), (1.0, 50, 1024), (10.0, 50, 256), (30.0, 50, 256)]
    )
    for scale, k, h in probes:
        slope, spread, _ = first_update_slope(emb_tr * scale, k, h)
        grid = scaled_lr_dni(emb_tr * scale, k=k, hidden=h)
        print(f"| {scale:g} | {k} | {h} | {slope:.3g} | {spread:.3f} | {spread / slope:.3g} | {grid} |")

    # ---- rules
    lr_grid = scaled_lr_dni(emb_tr, k=50, hidden=256)
    frac = holdout_fraction_for_k(sizes, 50, 70)
    L_rel, mp_rel, st_rel = relaxed_sequence_filter(emb_tr, lab_tr, 50, 1000, 2, 0.8)
    print(
        f"\n## rules on this data\n\nscaled_lr_dni (k=50, hidden=256): {lr_grid}\n"
        f"holdout_fraction_for_k(k=50, n_val_queries=70): {frac}\n"
        f"relaxed_sequence_filter(k=50, from L=1000, min_positives=2): L={L_rel}, min_positives={mp_rel}, "
        f"pass rate {st_rel['pass_rate']:.2f}, positives in top-k {st_rel['positives_in_topk']:.1f}"
    )

    # ---- training runs
    P = args.patience
    demo = dict(
        k=50,
        hidden=256,
        sequence_length=1000,
        min_positives=2,
        max_ap=0.8,
        iterations=600,
        val_every=250,
        batch_queries=16,
        lr=1e-3,
        holdout=0.05,
        n_val_queries=70,
        seed=args.seed,
    )
    cap = 1500
    rules = dict(demo, sequence_length=L_rel, min_positives=mp_rel, holdout=frac, iterations=cap, patience=P)
    if args.quick:
        settings = [
            Setting("demo", **dict(demo, lr_dni=1e-2, iterations=250)),
            Setting("rules (a-d)", **dict(rules, lr_dni=lr_grid[1], iterations=375, val_every=125, patience=2)),
        ]
    else:
        settings = [
            Setting("demo", **dict(demo, lr_dni=1e-3)),
            Setting("demo", **dict(demo, lr_dni=1e-2)),
            Setting("demo, rows x20 unnormalised", **dict(demo, lr_dni=1e-2, scale=20.0)),
            *[Setting(f"rules (a-d), grid[{i}]", **dict(rules, lr_dni=lr)) for i, lr in enumerate(lr_grid)],
            Setting(
                "rules, rows x20 unnormalised",
                **dict(rules, scale=20.0, lr_dni=scaled_lr_dni(emb_tr * 20.0, k=50, hidden=256)[1]),
            ),
            Setting(
                "rules, k=20",
                **dict(
                    rules,
                    k=20,
                    lr_dni=scaled_lr_dni(emb_tr, k=20, hidden=256)[1],
                    holdout=holdout_fraction_for_k(sizes, 20, 70),
                ),
            ),
            Setting(
                "rules, k=100",
                **dict(
                    rules,
                    k=100,
                    iterations=750,
                    lr_dni=scaled_lr_dni(emb_tr, k=100, hidden=256)[1],
                    holdout=holdout_fraction_for_k(sizes, 100, 70),
                ),
            ),
        ]
    results = []
    print("\n## training runs (test: 100 queries on 100 unseen classes; mAP = medium protocol, %)\n")
    for s in settings:
        r = train_once(data, s)
        results.append(r)
        print("  " + fmt_table([r]).splitlines()[-1], flush=True)  # the row as soon as it is known
    print()
    print(fmt_table(results))

    # ---- validation noise against hold-out size
    if not args.quick:
        r = results[3 + 1]  # rules, grid[1]
        s = r.setting
        print(
            f"\n## validation noise (model: '{s.name}', chosen iteration {r.chosen_iteration}, test gain "
            f"{100 * (r.test_after - r.test_before):+.2f}; {args.noise_repeats} fresh validation sets per size)\n"
        )
        print(
            "| hold-out fraction of 235 | classes | items~ | database~ | initial val mAP (mean +- std) | "
            "SSR gain on val (mean +- std) |"
        )
        print("|---|---|---|---|---|---|")
        for row in validation_noise(data, r.best_state, s, (0.05, 0.10, 0.20), repeats=args.noise_repeats):
            print(
                f"| {row['fraction']:.2f} | {row['classes']} | {row['items~']} | {row['db~']} | "
                f"{100 * row['val_map_mean']:.1f} +- {100 * row['val_map_std']:.1f} | "
                f"{100 * row['gain_mean']:+.2f} +- {100 * row['gain_std']:.2f} |"
            )
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
