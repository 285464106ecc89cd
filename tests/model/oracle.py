"""Plain-loop reference implementation of SSR, written from SSR_METHOD.md sections 2-4.

Slow on purpose: Python loops over references, explicit subgraph node lists, an explicit
strictly-upper-triangular walk and the DNI applied one row at a time with hand-written
instance norms. It takes its weights from a model's DNI modules (the Parameters
themselves, so gradients reach them) and is used to check the vectorised ssr_model code.
"""

from __future__ import annotations

import math

import torch

EPS_NORMALIZE = 1e-12
EPS_INSTANCE_NORM = 1e-5


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (n, D) divided by max(norm, 1e-12), one row at a time."""
    rows = []
    for i in range(x.shape[0]):
        norm = torch.sqrt((x[i] * x[i]).sum())
        rows.append(x[i] / torch.clamp(norm, min=EPS_NORMALIZE))
    return torch.stack(rows)


def cosine_matrix(nodes: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, M) cosine similarities."""
    unit = unit_rows(nodes)
    return unit @ unit.T


def instance_norm_row(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One row seen as one channel: biased variance, eps 1e-5, scalar affine."""
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return (v - mean) / torch.sqrt(var + EPS_INSTANCE_NORM) * weight[0] + bias[0]


def dni_row(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The DNI of section 2 on a single row x of shape (d_in,)."""
    h = instance_norm_row(x, params["layer1.0.weight"], params["layer1.0.bias"])
    h = torch.relu(params["layer1.1.weight"] @ h + params["layer1.1.bias"])
    h = instance_norm_row(h, params["layer1.3.weight"], params["layer1.3.bias"])
    h = torch.relu(params["layer2.0.weight"] @ h + params["layer2.0.bias"])
    h = instance_norm_row(h, params["layer2.2.weight"], params["layer2.2.bias"])
    return params["layer3.weight"] @ h + params["layer3.bias"]


def subgraph_vector(A: torch.Tensor, node_list: list[int], first_dropped: int) -> torch.Tensor:
    """Strict upper triangle of A on node_list, row-major, skipping pairs with both
    positions >= first_dropped."""
    rows, cols = [], []
    L = len(node_list)
    for i in range(L):
        for j in range(i + 1, L):
            if i >= first_dropped and j >= first_dropped:
                break  # j > i, so every later j of this row is dropped as well
            rows.append(node_list[i])
            cols.append(node_list[j])
    return A[rows, cols]


def fewshot_vectors(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Section 3 steps 2-3 for one episode: (n_way, D), (n_query, D) -> (M, d_in)."""
    n_way, n_query = P.shape[0], Q.shape[0]
    M = n_way + n_query
    A = cosine_matrix(torch.cat([P, Q]))
    vectors = []
    for r in range(M):
        sims = A[r].detach().tolist()
        protos = sorted(range(n_way), key=lambda i: -sims[i])
        queries = sorted(range(n_way, M), key=lambda j: -sims[j])
        node_list = [r] + protos + queries
        vectors.append(subgraph_vector(A, node_list, 1 + n_way))
    return torch.stack(vectors)


def retrieval_vectors(q: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Section 4 steps 1-2 for one query: (D,), (k, D) -> (1 + k, 2k + 1)."""
    k = B.shape[0]
    M = 1 + k
    A = cosine_matrix(torch.cat([q.unsqueeze(0), B]))
    vectors = []
    for r in range(M):
        sims = A[r].detach().tolist()
        database = sorted(range(1, M), key=lambda j: -sims[j])
        node_list = [r, 0] + database
        vectors.append(subgraph_vector(A, node_list, 2))
    return torch.stack(vectors)


def dni_step(target, build, params, lr_dni, create_graph):
    """target - lr * d<X, g>/d target with g = DNI(X) row by row, X = build(target).

    The derivative is taken with respect to a fresh copy of target, i.e. the other
    features are held fixed.
    """
    var = target.clone() if target.requires_grad else target.detach().clone().requires_grad_(True)
    X = build(var)
    g = torch.stack([dni_row(params, X[r]) for r in range(X.shape[0])])
    if not create_graph:
        g = g.detach()
    (grad,) = torch.autograd.grad(X, var, grad_outputs=g, create_graph=create_graph)
    return var - lr_dni * grad


def fewshot_episode(model, support: torch.Tensor, query: torch.Tensor, create_graph: bool = True):
    """One episode with ``model``'s weights. support (n_way, n_shot, D), query (n_query, D).

    Returns the list of scores (n_query, n_way) after 0, 1, ..., model.steps steps.
    """
    p_sup = dict(model.dni_support.named_parameters())
    p_qry = dict(model.dni_query.named_parameters())
    P = support.mean(1)
    Q = query

    def scores(P, Q):
        return model.scale_cls * (unit_rows(Q) @ unit_rows(P).T)

    out = [scores(P, Q)]
    for _ in range(model.steps):
        P = dni_step(P, lambda p: fewshot_vectors(p, Q), p_sup, model.lr_dni, create_graph)
        Q = dni_step(Q, lambda x: fewshot_vectors(P, x), p_qry, model.lr_dni, create_graph)
        out.append(scores(P, Q))
    return out


def retrieval_query(model, q: torch.Tensor, B: torch.Tensor, create_graph: bool = True):
    """One query with ``model``'s weights. q (D,), B (k, D).

    Returns the list of refined cosine similarities (k,) after 0, 1, ..., model.steps steps.
    """
    p_qry = dict(model.dni_query.named_parameters())
    p_db = dict(model.dni_database.named_parameters())

    def sims(q, B):
        return unit_rows(B) @ unit_rows(q.unsqueeze(0))[0]

    out = [sims(q, B)]
    for _ in range(model.steps):
        q = dni_step(q, lambda x: retrieval_vectors(x, B), p_qry, model.lr_dni, create_graph)
        B = dni_step(B, lambda x: retrieval_vectors(q, x), p_db, model.lr_dni, create_graph)
        out.append(sims(q, B))
    return out


def fewshot_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax(scores)[label], with explicit loops."""
    total = 0.0
    for i in range(scores.shape[0]):
        row = scores[i]
        total = total + (torch.logsumexp(row, 0) - row[int(labels[i])])
    return total / scores.shape[0]


def info_bce(x: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Section 4 loss for one query, literally: mean over positives of
    -log(exp(s x_p) / (exp(s x_p) + sum_n exp(s x_n))). None when there is no positive."""
    pos = [i for i in range(x.shape[0]) if bool(positives[i])]
    neg = [i for i in range(x.shape[0]) if not bool(positives[i])]
    if not pos:
        return None
    terms = []
    for p in pos:
        num = torch.exp(scale * x[p])
        den = num + sum((torch.exp(scale * x[n]) for n in neg), torch.zeros_like(num))
        terms.append(-torch.log(num / den))
    return sum(terms) / len(terms)


def expected_fewshot_d_in(n_way: int, n_query: int) -> int:
    M = n_way + n_query
    return math.comb(M + 1, 2) - math.comb(n_query, 2)
