"""The transductive few-shot peers against small cases computed by hand (ssr_model.baselines)."""

import math

import pytest
import torch

from ssr_model.baselines import PEER_METHODS, bd_cspn, laplacianshot, peer_method, pt_map, simpleshot, tim_gd
from ssr_model.baselines.bd_cspn import bd_cspn_prototypes
from ssr_model.baselines.laplacianshot import bound_updates, knn_affinity, laplacian_energy
from ssr_model.baselines.pt_map import pt_map_features, sinkhorn
from ssr_model.baselines.tim import tim_loss


def toy_episodes(E=3, W=5, K=1, Q=75, D=16, seed=0, spread=0.4):
    """Well-separated non-negative clusters: support (E, W, K, D), query (E, Q, D), labels (E, Q)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(E, W, D, generator=g) * 3
    labels = torch.arange(W).repeat_interleave(Q // W).expand(E, Q)
    support = (centres[:, :, None] + spread * torch.randn(E, W, K, D, generator=g)).abs()
    query = (
        torch.gather(centres, 1, labels[..., None].expand(E, Q, D)) + spread * torch.randn(E, Q, D, generator=g)
    ).abs()
    return support, query, labels


def test_simpleshot_is_nearest_centroid_after_centring_and_l2():
    support = torch.tensor([[[[3.0, 1.0]], [[1.0, 4.0]]]])  # (1, 2, 1, 2)
    query = torch.tensor([[[4.0, 1.5], [0.5, 3.0]]])
    base_mean = torch.tensor([1.0, 1.0])
    # centred and normalised: centroids (1, 0) and (0, 1); queries (3, 0.5)/|.| and (-0.5, 2)/|.|
    q0, q1 = (3 / math.sqrt(9.25), 0.5 / math.sqrt(9.25)), (-0.5 / math.sqrt(4.25), 2 / math.sqrt(4.25))
    expected = torch.tensor([[[-(2 - 2 * q0[0]), -(2 - 2 * q0[1])], [-(2 - 2 * q1[0]), -(2 - 2 * q1[1])]]])
    scores = simpleshot(support, query, base_mean)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert scores.argmax(-1).tolist() == [[0, 1]]


def test_bd_cspn_rectified_prototype_by_hand():
    support = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    query = torch.tensor([[[0.8, 0.6], [0.6, 0.8]]])
    # shift xi = mean(S) - mean(Q) = (0.5, 0.5) - (0.7, 0.7): queries (0.6, 0.4) and (0.4, 0.6),
    # pseudo-labels 0 and 1; class 0 set {(1, 0), (0.6, 0.4)} with cosines to P0 = (1, 0): 1 and 0.6/sqrt(0.52)
    w = torch.softmax(torch.tensor([10.0, 10 * 0.6 / math.sqrt(0.52)]), 0)
    p0 = w[0] * torch.tensor([1.0, 0.0]) + w[1] * torch.tensor([0.6, 0.4])
    assert abs(float(w[0]) - 0.84285) < 1e-4
    protos, shifted = bd_cspn_prototypes(support, query)
    torch.testing.assert_close(shifted, torch.tensor([[[0.6, 0.4], [0.4, 0.6]]]))
    torch.testing.assert_close(protos[0, 0], p0)
    torch.testing.assert_close(protos[0, 1], p0.flip(0))
    assert bd_cspn(support, query).argmax(-1).tolist() == [[0, 1]]


def test_tim_loss_terms_by_hand_and_the_marginal_term():
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    support = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    balanced = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # T = 1: logits x.w_k - |w_k|^2 / 2 are (0.5, -0.5) for x = (1, 0): p = (0.7311, 0.2689)
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    terms = tim_loss(w, support, balanced, temperature=1.0)
    assert terms["ce"].item() == pytest.approx(-math.log(p), abs=1e-5)
    assert terms["marginal_entropy"].item() == pytest.approx(math.log(2), abs=1e-5)  # balanced predictions: maximal
    assert terms["conditional_entropy"].item() == pytest.approx(h, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(0.1 * -math.log(p) - math.log(2) + 0.1 * h, abs=1e-5)
    imbalanced = tim_loss(w, support, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), temperature=1.0)
    assert imbalanced["marginal_entropy"].item() == pytest.approx(h, abs=1e-5)  # marginal (p, 1 - p) < log 2
    assert imbalanced["loss"].item() > terms["loss"].item()


def test_tim_gd_decreases_its_loss_and_classifies_toy_episodes():
    support, query, labels = toy_episodes()
    history: list[torch.Tensor] = []
    with torch.no_grad():  # the evaluation actors call it under no_grad
        probs = tim_gd(support, query, iterations=200, history=history)
    assert probs.shape == (3, 75, 5) and not probs.requires_grad
    losses = torch.stack(history)  # (iterations, E)
    assert bool((losses[-1] < losses[0] - 1e-3).all())
    assert float((losses[1:] - losses[:-1]).clamp_min(0).sum()) < 1e-3  # no upward steps at lr 1e-4
    assert (probs.argmax(-1) == labels).float().mean() > 0.95
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 75))


def test_sinkhorn_marginals():
    # zero cost: the plan is r_i c_j / total
    p = sinkhorn(torch.zeros(1, 2, 2), 10.0, torch.ones(1, 2), torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(p, torch.tensor([[[0.75, 0.25], [0.75, 0.25]]]))
    cost = torch.rand(4, 75, 5, generator=torch.Generator().manual_seed(1)) * 4
    plan = sinkhorn(cost, 10.0, torch.ones(4, 75), torch.full((4, 5), 15.0))
    torch.testing.assert_close(plan.sum(1), torch.full((4, 5), 15.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(2), torch.ones(4, 75), atol=1e-4, rtol=0)


def test_pt_map_features_and_predictions():
    support, query, labels = toy_episodes(E=2)
    s, q = pt_map_features(support, query)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(2, 5, 1))
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 75))
    probs = pt_map(support, query)
    torch.testing.assert_close(probs.sum(1), torch.full((2, 5), 15.0), atol=1e-3, rtol=0)  # balanced class marginal
    assert (probs.argmax(-1) == labels).float().mean() > 0.95


def test_knn_affinity_on_a_line():
    x = torch.tensor([[[0.0], [1.0], [3.0], [7.0]]])
    # the two nearest other points: 0 -> {1, 3}, 1 -> {0, 3}, 3 -> {1, 0}, 7 -> {3, 1}
    w = knn_affinity(x, 2)
    assert w[0].tolist() == [[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]]


def test_laplacianshot_bound_update_by_hand_and_energy():
    unary = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.6, 0.4]]])
    affinity = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    y0 = torch.softmax(-unary, -1)
    y1 = torch.softmax(-unary + 0.5 * affinity @ y0, -1)
    torch.testing.assert_close(bound_updates(unary, affinity, 0.5, max_iters=1), y1)
    # lambda = 0: SimpleShot-like soft assignment, one update and done
    torch.testing.assert_close(bound_updates(unary, affinity, 0.0), y0)
    # a positive semi-definite affinity (all ones): each bound update lowers the energy
    energies: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(2)
    unary = torch.rand(2, 6, 3, generator=g) * 2
    bound_updates(unary, torch.ones(2, 6, 6), 0.3, energies=energies)
    e = torch.stack([laplacian_energy(torch.softmax(-unary, -1), unary, torch.ones(2, 6, 6), 0.3)] + energies)
    assert bool((e[1:] <= e[:-1] + 1e-5).all())


def test_every_peer_runs_batched_and_beats_chance_on_toy_episodes():
    support, query, labels = toy_episodes(E=2, K=5)
    base_mean = torch.cat([support.reshape(-1, 16), query.reshape(-1, 16)]).mean(0)
    for name, method in PEER_METHODS.items():
        with torch.no_grad():
            scores = method.score(support, query, base_mean)
        assert scores.shape == (2, 75, 5), name
        assert (scores.argmax(-1) == labels).float().mean() > 0.9, name


def test_errors_name_the_method():
    with pytest.raises(ValueError, match="unknown few-shot method 'tim-x'.*simpleshot"):
        peer_method("tim-x")
    with pytest.raises(ValueError, match="laplacianshot: needs at least 4 queries"):
        peer_method("laplacianshot").check(5, 1, 3)
    with pytest.raises(ValueError, match="tim: needs n_way >= 2 and n_shot >= 1"):
        peer_method("tim").check(5, 0, 75)
    with pytest.raises(ValueError, match="laplacianshot: needs more than knn=3"):
        laplacianshot(torch.rand(1, 2, 1, 4), torch.rand(1, 3, 4))


def test_tim_closed_form_gradient_matches_autograd():
    from ssr_model.baselines.episode_features import support_one_hot
    from ssr_model.baselines.tim import _terms, tim_gradient

    support, query, _ = toy_episodes(E=2, K=2, Q=15, D=8)
    s, q = torch.nn.functional.normalize(support, dim=-1), torch.nn.functional.normalize(query, dim=-1)
    x = torch.cat([s.reshape(2, 10, 8), q], 1).double()
    one_hot = support_one_hot(s).double()
    w = (
        (s.mean(2) + 0.1 * torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)))
        .double()
        .requires_grad_(True)
    )
    _terms(w, x, one_hot, 15.0, (0.1, 1.0, 0.1))["loss"].sum().backward()
    torch.testing.assert_close(tim_gradient(w.detach(), x, one_hot), w.grad, atol=1e-9, rtol=1e-7)


def test_tim_gd_follows_torch_adam_on_the_autograd_loss():
    from ssr_model.baselines.episode_features import support_one_hot
    from ssr_model.baselines.tim import _terms, tim_probs

    support, query, _ = toy_episodes(E=2, Q=15, D=8)
    s, q = torch.nn.functional.normalize(support, dim=-1), torch.nn.functional.normalize(query, dim=-1)
    x, one_hot = torch.cat([s.reshape(2, 5, 8), q], 1), support_one_hot(s)
    w = s.mean(2).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)  # a large lr so that 30 steps move far
    for _ in range(30):
        opt.zero_grad()
        _terms(w, x, one_hot, 15.0, (0.1, 1.0, 0.1))["loss"].sum().backward()
        opt.step()
    torch.testing.assert_close(
        tim_gd(support, query, iterations=30, lr=1e-2), tim_probs(w.detach(), q), atol=1e-4, rtol=0
    )
