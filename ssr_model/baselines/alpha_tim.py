"""alpha-TIM (Veilleux et al., "Realistic evaluation of transductive few-shot learning", NeurIPS 2021).

TIM (``tim.py``) maximises the Shannon mutual information between queries and predictions;
its marginal-entropy term pushes the predicted class proportions towards uniform, which
hurts on imbalanced (Dirichlet) query sets. alpha-TIM replaces the two entropies of that
mutual information by Tsallis alpha-entropies, H_a(p) = (1 - sum_k p_k^a) / (a - 1). They
tend to Shannon's as a -> 1; for a > 1 the marginal term's gradient in a class's predicted
share, -a/(a-1) pbar_k^(a-1), stays bounded where Shannon's, -log pbar_k - 1, grows without
bound, so a rare class is not pushed up towards 1/n_way as hard. The loss is

    lambda_ce * CE(support) - lambda_marg * H_a(mean over queries of p(.|x)) + lambda_cond * mean over queries of H_a(p(.|x))

Same model as TIM: L2-normalised features, class weights W (n_way, D) initialised at the
support prototypes, p(k | x) = softmax_k(-T/2 ||x - w_k||^2), T = 15, Adam lr 1e-4, 1,000
iterations. Their settings (the authors' released configuration, which reproduces the paper):
weights (lambda_ce, lambda_marg, lambda_cond) = (1, 1, 1); the support term stays Shannon
cross-entropy; a = 2 at 1-shot and 7 at 5 shots and more (tuned on validation by the
authors); for 2 to 4 shots, which they do not report, their configuration's default 5.
"""

from __future__ import annotations

import torch

from .episode_features import l2n, prototypes, support_one_hot, unpack
from .tim import tim_probs

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)


def alpha_for_shots(n_shot: int) -> float:
    """The authors' alpha for an n_shot episode: 2 at 1-shot, 7 from 5 shots, 5 in between."""
    return 2.0 if n_shot == 1 else 7.0 if n_shot >= 5 else 5.0


def alpha_entropy(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Tsallis entropy (1 - sum_k p_k^alpha) / (alpha - 1) over the last axis; alpha > 0, != 1."""
    return (1 - p.pow(alpha).sum(-1)) / (alpha - 1)


def alpha_tim_loss(
    weights: torch.Tensor,
    support: torch.Tensor,
    query: torch.Tensor,
    alpha: float,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """The loss terms per episode, each (E,): ``ce``, ``marginal_entropy``, ``conditional_entropy`` (both alpha-entropies), ``loss``.

    weights: (E, n_way, D); support: (E, n_way, n_shot, D) and query (E, n_query, D), already normalised.
    """
    E, W, K, Q, D = unpack(support, query)
    x = torch.cat([support.reshape(E, W * K, D), query], 1)
    return _terms(weights, x, support_one_hot(support), alpha, temperature, loss_weights)


def _terms(
    weights: torch.Tensor,
    x: torch.Tensor,
    one_hot: torch.Tensor,
    alpha: float,
    temperature: float,
    loss_weights: tuple[float, float, float],
) -> dict[str, torch.Tensor]:
    """alpha_tim_loss on x = [flattened support; query] (E, n_support + n_query, D), one_hot (E, n_support, n_way)."""
    p = tim_probs(weights, x, temperature)
    n_support = one_hot.shape[1]
    p_s, p_q = p[:, :n_support], p[:, n_support:]
    ce = -(one_hot * torch.log(p_s + 1e-12)).sum(-1).mean(-1)
    h_marg = alpha_entropy(p_q.mean(1), alpha)
    h_cond = alpha_entropy(p_q, alpha).mean(-1)
    l_ce, l_marg, l_cond = loss_weights
    return {
        "ce": ce,
        "marginal_entropy": h_marg,
        "conditional_entropy": h_cond,
        "loss": l_ce * ce - l_marg * h_marg + l_cond * h_cond,
    }


def alpha_tim_gradient(
    weights: torch.Tensor,
    x: torch.Tensor,
    one_hot: torch.Tensor,
    alpha: float,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> torch.Tensor:
    """d loss / d weights in closed form, (E, n_way, D) (the loss of ``alpha_tim_loss`` without its eps in the log).

    weights (E, n_way, D); x = [flattened support; query] (E, n_support + n_query, D); one_hot
    (E, n_support, n_way). With z = T (x.w_k - |w_k|^2 / 2), p = softmax(z), pbar = the query
    mean of p and c = alpha / ((alpha - 1) n_query): dL/dz is lambda_ce (p - y) / n_support on the
    support, and on each query
    c (lambda_marg p_k (pbar_k^(a-1) - sum_j p_j pbar_j^(a-1)) - lambda_cond (p_k^a - p_k sum_j p_j^a));
    then dL/dw_k = T sum_n dL/dz_nk (x_n - w_k).
    """
    n_support = one_hot.shape[1]
    z = temperature * (x @ weights.transpose(1, 2) - 0.5 * (weights * weights).sum(-1).unsqueeze(1))
    p = torch.softmax(z, -1)
    p_s, p_q = p[:, :n_support], p[:, n_support:]
    n_query = p_q.shape[1]
    l_ce, l_marg, l_cond = loss_weights
    bar_pow = p_q.mean(1, keepdim=True).pow(alpha - 1)  # (E, 1, n_way)
    g_marg = p_q * (bar_pow - (p_q * bar_pow).sum(-1, keepdim=True))
    q_pow = p_q.pow(alpha)
    g_cond = q_pow - p_q * q_pow.sum(-1, keepdim=True)
    c = alpha / ((alpha - 1) * n_query)
    g = torch.cat([l_ce * (p_s - one_hot) / n_support, c * (l_marg * g_marg - l_cond * g_cond)], 1)
    return temperature * (g.transpose(1, 2) @ x - g.sum(1).unsqueeze(-1) * weights)


def alpha_tim(
    support: torch.Tensor,
    query: torch.Tensor,
    alpha: float | None = None,
    iterations: int = 1000,
    lr: float = 1e-4,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
    history: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Query probabilities (E, n_query, n_way) after alpha-TIM.

    support: (E, n_way, n_shot, D); query: (E, n_query, D). alpha: None for the authors' value
    at this n_shot (``alpha_for_shots``). Adam (betas 0.9, 0.999, eps 1e-8, as
    ``torch.optim.Adam``) on the closed-form gradient (``alpha_tim_gradient``), no autograd, so
    it runs the same under ``torch.no_grad`` / ``inference_mode``. ``history``, when given,
    receives the per-episode loss (E,) before each step.
    """
    E, W, K, Q, D = unpack(support, query)
    a = alpha_for_shots(K) if alpha is None else float(alpha)
    if not a > 0 or a == 1:
        raise ValueError(f"alpha-tim: alpha must be > 0 and != 1 (1 is TIM), got {a}")
    s, q = l2n(support), l2n(query)
    x, one_hot = torch.cat([s.reshape(E, W * K, D), q], 1), support_one_hot(s)
    weights = prototypes(s).clone()
    m, v = torch.zeros_like(weights), torch.zeros_like(weights)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        if history is not None:
            history.append(_terms(weights, x, one_hot, a, temperature, loss_weights)["loss"])
        g = alpha_tim_gradient(weights, x, one_hot, a, temperature, loss_weights)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = lr / (1 - beta1**t)
        weights = weights - step * m / ((v / (1 - beta2**t)).sqrt() + eps)
    return tim_probs(weights, q, temperature)
