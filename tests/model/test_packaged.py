"""The registry-ready few-shot wrapper: exact SSR at n_query queries, any n >= 1 otherwise."""

from __future__ import annotations

import pytest
import torch

from ssr_model.fewshot import FewShotSSR
from ssr_model.packaged import FewShotClassifier

D, N_WAY, N_QUERY = 16, 3, 6


@pytest.fixture(scope="module")
def classifier() -> FewShotClassifier:
    torch.manual_seed(0)
    return FewShotClassifier(FewShotSSR(D, N_WAY, N_QUERY, steps=2, lr_dni=5e-2, hidden=32, dtype=torch.float64)).eval()


def episode(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_WAY, 2, D, generator=gen, dtype=torch.float64), torch.randn(
        n, D, generator=gen, dtype=torch.float64
    )


def test_exact_at_n_query(classifier):
    support, query = episode(N_QUERY)
    with torch.no_grad():
        torch.testing.assert_close(classifier(support, query), classifier.ssr(support, query), rtol=0, atol=0)


def test_more_queries_scored_in_groups_with_context(classifier):
    support, query = episode(2 * N_QUERY + 2)  # groups: 0..5, 6..11, 12..13 + context 0..3
    with torch.no_grad():
        scores = classifier(support, query)
        assert scores.shape == (2 * N_QUERY + 2, N_WAY)
        torch.testing.assert_close(scores[:N_QUERY], classifier.ssr(support, query[:N_QUERY]), rtol=1e-12, atol=1e-12)
        last = classifier.ssr(support, torch.cat((query[12:], query[:4])))
        torch.testing.assert_close(scores[12:], last[:2], rtol=1e-12, atol=1e-12)
        assert classifier.predict(support, query).shape == (2 * N_QUERY + 2,)


@pytest.mark.parametrize("n", [1, 4])
def test_fewer_queries_repeat_to_fill_one_group(classifier, n):
    support, query = episode(n)
    with torch.no_grad():
        filled = query[torch.arange(N_QUERY) % n]
        torch.testing.assert_close(
            classifier(support, query), classifier.ssr(support, filled)[:n], rtol=1e-12, atol=1e-12
        )


def test_batched_inputs_still_need_n_query(classifier):
    support, query = episode(N_QUERY - 1)
    with pytest.raises(ValueError, match=f"n_query={N_QUERY}"):
        classifier(support[None], query[None])
