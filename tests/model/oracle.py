"""Plain-loop reference implementation of SSR, written from SSR_METHOD.md sections 2-4.

Slow on purpose: one episode (or query) at a time, Python loops over references,
explicit subgraph node lists, an explicit strictly-upper-triangular walk and the DNI
applied one row at a time with hand-written instance norms. It takes its weights from a
model's DNI modules (the Parameters themselves, so gradients reach them) and is used to
check the vectorised ssr_model code over many shapes; the authors' own figures
(tests/model/data/ssr_golden.npz) check both.

Every update takes the *total* derivative (section 3.4): the features are updated in
place in one autograd graph, ``create_graph=True`` each time, and each gradient is taken
w.r.t. the current tensor of the set being updated, so it also follows the path through
the other set's previous update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS_NORMALIZE = 1e-12
EPS_INSTANCE_NORM = 1e-5


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (n, D) divided by max(norm, 1e-12), one row at a time (the clamp sits on
    the squared norm so that derivatives stay finite at a zero row)."""
    rows = []
    for i in range(x.shape[0]):
        norm = torch.sqrt(torch.clamp((x[i] * x[i]).sum(), min=EPS_NORMALIZE**2))
        rows.append(x[i] / norm)
    return torch.stack(rows)


def cosine_matrix(nodes: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, M) cosine similarities."""
    unit = unit_rows(nodes)
    return unit @ unit.T


def instance_norm_row(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One row seen as one channel of one sample, through torch's native instance norm
    (biased variance, eps 1e-5, scalar affine), as the authors' ``nn.InstanceNorm1d(1)``.

    Native, not written out by hand, on purpose: PyTorch differentiates its native
    normalisation kernels exactly to second order but not to third, and a DNI parameter
    gradient of SSR (with two or more refinement steps) needs the third. The authors'
    figures carry that approximation (up to ~1% on some DNI weight gradients against a
    finite-difference check, measured), and so does ssr_model (it equals them to 1e-15);
    a hand-written norm would give the mathematically exact gradient instead.
    """
    return F.instance_norm(v.view(1, 1, -1), weight=weight, bias=bias, eps=EPS_INSTANCE_NORM).view(-1)


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


def as_graph_leaf(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is already in a graph, else a leaf copy that requires grad."""
    return x if x.requires_grad else x.detach().clone().requires_grad_(True)


def dni_step(target, X, params, lr_dni):
    """target - lr * d<X, g>/d target with g = DNI(X) row by row, X built from target.

    ``target`` is the current tensor of the set being updated, not a copy, so the
    gradient follows every path of the graph from it to X (the total derivative).
    """
    g = torch.stack([dni_row(params, X[r]) for r in range(X.shape[0])])
    (grad,) = torch.autograd.grad(X, target, grad_outputs=g, create_graph=True)
    return target - lr_dni * grad


def fewshot_episode(model, support: torch.Tensor, query: torch.Tensor):
    """One episode with ``model``'s weights. support (n_way, n_shot, D), query (n_query, D).

    Returns the list of scores (n_query, n_way) after 0, 1, ..., model.steps steps (with
    their graph; detach them to compare inference outputs).
    """
    p_sup = dict(model.dni_support.named_parameters())
    p_qry = dict(model.dni_query.named_parameters())
    P = as_graph_leaf(support).mean(1)
    Q = as_graph_leaf(query)

    def scores(P, Q):
        return model.scale_cls * (unit_rows(Q) @ unit_rows(P).T)

    out = [scores(P, Q)]
    for _ in range(model.steps):
        P = dni_step(P, fewshot_vectors(P, Q), p_sup, model.lr_dni)
        Q = dni_step(Q, fewshot_vectors(P, Q), p_qry, model.lr_dni)
        out.append(scores(P, Q))
    return out


def retrieval_query(model, q: torch.Tensor, B: torch.Tensor):
    """One query with ``model``'s weights. q (D,), B (k, D).

    Returns the list of refined cosine similarities (k,) after 0, 1, ..., model.steps steps.
    """
    p_qry = dict(model.dni_query.named_parameters())
    p_db = dict(model.dni_database.named_parameters())

    def sims(q, B):
        return unit_rows(B) @ unit_rows(q.unsqueeze(0))[0]

    q, B = as_graph_leaf(q), as_graph_leaf(B)
    out = [sims(q, B)]
    for _ in range(model.steps):
        q = dni_step(q, retrieval_vectors(q, B), p_qry, model.lr_dni)
        B = dni_step(B, retrieval_vectors(q, B), p_db, model.lr_dni)
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
