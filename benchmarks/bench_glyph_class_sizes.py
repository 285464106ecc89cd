"""How many renderings a glyph test class needs so that Dirichlet query sets repeat no image.

    python benchmarks/bench_glyph_class_sizes.py [--draws 200000] [--alpha 2]

A Dirichlet(ALPHA) test episode (the alpha-TIM protocol, ``query_balance: dirichlet:ALPHA``)
splits 75 queries over 5 classes with the project's own ``dirichlet_counts``; its largest
class needs ``count + n_shot`` distinct images. Prints the percentiles of that need over
``--draws`` draws, then, for several class sizes, the share of episodes with a repeated
query and the share of repeated queries, from ``sample_dirichlet_episodes`` over 200 test
classes (as the default glyph set has). Not a test; tests/storage/test_glyph_class_sizes.py
checks the figure the default size rests on.
"""

from __future__ import annotations

import argparse

import numpy as np

from ssr_tasks.fewshot.episodes import (
    SplitFeatures,
    dirichlet_counts,
    repeated_query_fraction,
    sample_dirichlet_episodes,
)
from storage.glyphs import SIZES

N_WAY, N_QUERY_TOTAL = 5, 75
PERCENTILES = (50, 90, 95, 99, 99.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200_000)
    ap.add_argument("--episodes", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 52, 60, 80])
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    largest = np.array([dirichlet_counts(args.alpha, N_WAY, N_QUERY_TOTAL, rng).max() for _ in range(args.draws)])
    print(f"Dirichlet({args.alpha:g}), {N_WAY} ways, {N_QUERY_TOTAL} queries, {args.draws:,} draws")
    print("\n| images the largest class needs | " + " | ".join(f"p{p:g}" for p in PERCENTILES) + " | max |")
    print("|---" * (len(PERCENTILES) + 2) + "|")
    for n_shot in (1, 5):
        need = largest + n_shot
        cells = [str(int(np.percentile(need, p, method="higher"))) for p in PERCENTILES]
        print(f"| {n_shot}-shot | " + " | ".join(cells) + f" | {int(need.max())} |")

    print(f"\nsample_dirichlet_episodes, 200 classes, {args.episodes:,} episodes per cell:")
    print(
        "\n| images per test class | 1-shot: episodes with a repeat | 1-shot: repeated queries "
        "| 5-shot: episodes with a repeat | 5-shot: repeated queries |"
    )
    print("|---|---|---|---|---|")
    for per_class in args.sizes:
        labels = np.repeat(np.arange(200), per_class)
        split = SplitFeatures(np.zeros((len(labels), 1), np.float32), labels, [str(c) for c in range(200)], None)
        cells = []
        for n_shot in (1, 5):
            eps = sample_dirichlet_episodes(split, args.episodes, N_WAY, n_shot, N_QUERY_TOTAL, args.alpha, seed=20_000)
            with_repeat = np.mean([len(np.unique(row)) < len(row) for row in eps.query])
            cells += [f"{100 * with_repeat:.2f}%", f"{100 * repeated_query_fraction(eps):.2f}%"]
        print(f"| {per_class} | " + " | ".join(cells) + " |")
    print(f"\nglyphs 'default': {SIZES['default'].test_images_per_class} images per test class")


if __name__ == "__main__":
    main()
