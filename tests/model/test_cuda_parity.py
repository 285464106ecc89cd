"""CPU and CUDA compute the same SSR (float32, 1e-5). Marked ``gpu``: skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from ssr_model.fewshot import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy, info_bce
from ssr_model.retrieval import RetrievalSSR

pytestmark = pytest.mark.gpu
TOL = 1e-5


def fewshot_case(E: int = 3, n_way: int = 5, n_shot: int = 1, n_query: int = 75, D: int = 64):
    torch.manual_seed(0)
    model = FewShotSSR(D, n_way, n_query, steps=3, lr_dni=1e-2, hidden=128)
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(E, n_way, n_shot, D, generator=gen)
    query = torch.randn(E, n_query, D, generator=gen)
    labels = torch.randint(0, n_way, (E, n_query), generator=gen)
    return model, support, query, labels


def test_fewshot_inference_and_gradients_cpu_equal_cuda():
    model, support, query, labels = fewshot_case()
    cuda = torch.device("cuda")
    model_cuda = FewShotSSR(64, 5, 75, steps=3, lr_dni=1e-2, hidden=128, device=cuda)
    model_cuda.load_state_dict(model.state_dict())

    with torch.no_grad():
        cpu_scores = model.eval()(support, query)
        cuda_scores = model_cuda.eval()(support.to(cuda), query.to(cuda))
    torch.testing.assert_close(cuda_scores.cpu(), cpu_scores, rtol=TOL, atol=TOL)

    cpu_grads = torch.autograd.grad(
        fewshot_cross_entropy(model.train()(support, query), labels), list(model.parameters())
    )
    cuda_loss = fewshot_cross_entropy(model_cuda.train()(support.to(cuda), query.to(cuda)), labels.to(cuda))
    cuda_grads = torch.autograd.grad(cuda_loss, list(model_cuda.parameters()))
    for (name, _), g_cpu, g_cuda in zip(model.named_parameters(), cpu_grads, cuda_grads):
        scale = max(g_cpu.abs().max().item(), 1.0)
        torch.testing.assert_close(
            g_cuda.cpu() / scale, g_cpu / scale, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}"
        )


def test_retrieval_inference_cpu_equals_cuda():
    torch.manual_seed(0)
    model = RetrievalSSR(64, 100, steps=2, lr_dni=1e-2, hidden=128)
    cuda = torch.device("cuda")
    model_cuda = RetrievalSSR(64, 100, steps=2, lr_dni=1e-2, hidden=128, device=cuda)
    model_cuda.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    query, neighbours = torch.randn(4, 64, generator=gen), torch.randn(4, 100, 64, generator=gen)
    positives = torch.rand(4, 100, generator=gen) < 0.2
    with torch.no_grad():
        cpu_sims = model.eval()(query, neighbours)
        cuda_sims = model_cuda.eval()(query.to(cuda), neighbours.to(cuda))
    torch.testing.assert_close(cuda_sims.cpu(), cpu_sims, rtol=TOL, atol=TOL)
    cpu_loss = info_bce(model.train()(query, neighbours), positives, model.scale_cls)
    cuda_loss = info_bce(
        model_cuda.train()(query.to(cuda), neighbours.to(cuda)), positives.to(cuda), model_cuda.scale_cls
    )
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=TOL, atol=TOL)
