"""TIM, gradient-descent variant (Boudiaf et al., NeurIPS 2020): transductive information maximisation.

Features are L2-normalised. Each episode has class weights W (n_way, D), initialised at the
support prototypes; p(k | x) = softmax_k(-T/2 * ||x - w_k||^2) with temperature T = 15. The
loss, minimised over W with Adam (lr 1e-4, 1,000 iterations), is

    lambda_ce * CE(support) - lambda_marg * H(mean over queries of p(.|x)) + lambda_cond * mean over queries of H(p(.|x))

with the paper's weights (lambda_ce, lambda_marg, lambda_cond) = (0.1, 1.0, 0.1). The
marginal-entropy term pushes the predicted class proportions of the queries towards
uniform: the reason TIM degrades on imbalanced query sets (alpha-TIM, 2021).
Episodes of a batch are independent: the loss is summed over them and Adam is elementwise.
"""

from __future__ import annotations

import torch

from .episode_features import l2n, prototypes, support_one_hot, unpack

DEFAULT_WEIGHTS = (0.1, 1.0, 0.1)


def tim_probs(weights: torch.Tensor, x: torch.Tensor, temperature: float = 15.0) -> torch.Tensor:
    """p(k | x) = softmax_k(-T/2 ||x - w_k||^2): weights (E, n_way, D), x (E, N, D) -> (E, N, n_way).

    Computed as softmax_k(T x.w_k - T/2 ||w_k||^2): ||x||^2 is the same for every k.
    """
    logits = temperature * (x @ weights.transpose(1, 2) - 0.5 * (weights * weights).sum(-1).unsqueeze(1))
    return torch.softmax(logits, dim=-1)


def tim_loss(
    weights: torch.Tensor,
    support: torch.Tensor,
    query: torch.Tensor,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """The loss terms per episode, each (E,): ``ce``, ``marginal_entropy``, ``conditional_entropy``, ``loss``.

    weights: (E, n_way, D); support: (E, n_way, n_shot, D) and query (E, n_query, D), already normalised.
    """
    E, W, K, Q, D = unpack(support, query)
    x = torch.cat([support.reshape(E, W * K, D), query], 1)
    return _terms(weights, x, support_one_hot(support), temperature, loss_weights)


def _terms(
    weights: torch.Tensor,
    x: torch.Tensor,
    one_hot: torch.Tensor,
    temperature: float,
    loss_weights: tuple[float, float, float],
) -> dict[str, torch.Tensor]:
    """tim_loss on x = [flattened support; query] (E, n_support + n_query, D), one_hot (E, n_support, n_way)."""
    eps = 1e-12
    p = tim_probs(weights, x, temperature)  # one product per step for support and queries
    n_support = one_hot.shape[1]
    p_s, p_q = p[:, :n_support], p[:, n_support:]
    ce = -(one_hot * torch.log(p_s + eps)).sum(-1).mean(-1)
    marginal = p_q.mean(1)
    h_marg = -(marginal * torch.log(marginal + eps)).sum(-1)
    h_cond = -(p_q * torch.log(p_q + eps)).sum(-1).mean(-1)
    l_ce, l_marg, l_cond = loss_weights
    return {
        "ce": ce,
        "marginal_entropy": h_marg,
        "conditional_entropy": h_cond,
        "loss": l_ce * ce - l_marg * h_marg + l_cond * h_cond,
    }


def tim_gradient(
    weights: torch.Tensor,
    x: torch.Tensor,
    one_hot: torch.Tensor,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> torch.Tensor:
    """d loss / d weights in closed form, (E, n_way, D) (the loss of ``tim_loss`` without its eps 1e-12 in the logs).

    weights (E, n_way, D); x = [flattened support; query] (E, n_support + n_query, D); one_hot
    (E, n_support, n_way). With z = T (x.w_k - |w_k|^2 / 2), p = softmax(z), pbar = the query mean of p:
    dL/dz is lambda_ce (p - y) / n_support on the support, and on each query
    (lambda_marg p_k (log pbar_k - sum_j p_j log pbar_j) - lambda_cond p_k (log p_k - sum_j p_j log p_j)) / n_query;
    then dL/dw_k = T sum_n dL/dz_nk (x_n - w_k).
    """
    n_support = one_hot.shape[1]
    z = temperature * (x @ weights.transpose(1, 2) - 0.5 * (weights * weights).sum(-1).unsqueeze(1))
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    p_s, p_q, log_q = p[:, :n_support], p[:, n_support:], log_p[:, n_support:]
    n_query = p_q.shape[1]
    l_ce, l_marg, l_cond = loss_weights
    log_bar = torch.log(p_q.mean(1, keepdim=True))  # (E, 1, n_way)
    g_marg = p_q * (log_bar - (p_q * log_bar).sum(-1, keepdim=True))
    g_cond = p_q * (log_q - (p_q * log_q).sum(-1, keepdim=True))
    g = torch.cat([l_ce * (p_s - one_hot) / n_support, (l_marg * g_marg - l_cond * g_cond) / n_query], 1)
    return temperature * (g.transpose(1, 2) @ x - g.sum(1).unsqueeze(-1) * weights)


def tim_gd(
    support: torch.Tensor,
    query: torch.Tensor,
    iterations: int = 1000,
    lr: float = 1e-4,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
    history: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Query probabilities (E, n_query, n_way) after TIM-GD.

    support: (E, n_way, n_shot, D); query: (E, n_query, D). Adam (betas 0.9, 0.999, eps 1e-8,
    as ``torch.optim.Adam``) on the closed-form gradient (``tim_gradient``), no autograd, so
    it runs the same under ``torch.no_grad`` / ``inference_mode``. ``history``, when given,
    receives the per-episode loss (E,) before each step.
    """
    E, W, K, Q, D = unpack(support, query)
    s, q = l2n(support), l2n(query)
    x, one_hot = torch.cat([s.reshape(E, W * K, D), q], 1), support_one_hot(s)
    weights = prototypes(s).clone()
    m, v = torch.zeros_like(weights), torch.zeros_like(weights)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        if history is not None:
            history.append(_terms(weights, x, one_hot, temperature, loss_weights)["loss"])
        g = tim_gradient(weights, x, one_hot, temperature, loss_weights)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = lr / (1 - beta1**t)
        weights = weights - step * m / ((v / (1 - beta2**t)).sqrt() + eps)
    return tim_probs(weights, q, temperature)
