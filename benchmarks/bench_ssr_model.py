"""Speed of the vectorised SSR models at inference, next to the plain-loop oracle and a
matmul floor. Prints a Markdown table. Not a test.

    python benchmarks/bench_ssr_model.py                 # CPU, 2 threads
    python benchmarks/bench_ssr_model.py --device cuda

Rows:
* few-shot 5-way 1-shot, 75 queries, D=640, DNI hidden 4096, steps 1 and 3, E episodes
  per batch, under ``torch.no_grad()``: ms per episode.
  floor = the DNI Linear layers alone (F.linear on (E*M, d_in) -> h -> h -> d_in, two
  DNIs per step), per episode. Target: vectorised <= 1.5 x floor at steps 3.
* retrieval k=100, D=2048, hidden 1024, steps 1, B queries per batch: ms per query.
  Target <= 5 ms.
The oracle (tests/model/oracle.py) runs fewer episodes / queries.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "model"))

import oracle  # noqa: E402
from ssr_model.fewshot import FewShotSSR  # noqa: E402
from ssr_model.retrieval import RetrievalSSR  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def timed_pair(fn_a, fn_b, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall time (seconds) of fn_a() and fn_b(), measured alternately
    after one warm-up each, so that load from other processes hits both alike."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(once(fn_a))
        times_b.append(once(fn_b))
    return min(times_a), min(times_b)


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dni_floor_fn(dni, rows: int, n_dni: int, device, dtype):
    """A callable running n_dni passes of the DNI's three Linear layers on (rows, d_in)."""
    fc1, fc2, fc3 = dni.layer1[1], dni.layer2[0], dni.layer3
    x = torch.randn(rows, fc1.in_features, device=device, dtype=dtype)

    def run():
        for _ in range(n_dni):
            F.linear(F.linear(F.linear(x, fc1.weight, fc1.bias), fc2.weight, fc2.bias), fc3.weight, fc3.bias)

    return run


def bench_fewshot(args, device) -> list[tuple[str, str, str, str, str]]:
    n_way, n_shot, n_query, D, hidden, E = 5, 1, 75, 640, 4096, args.episodes
    rows = []
    gen = torch.Generator().manual_seed(0)
    support = torch.randn(E, n_way, n_shot, D, generator=gen).to(device)
    query = torch.randn(E, n_query, D, generator=gen).to(device)
    for steps in (1, 3):
        torch.manual_seed(0)
        model = FewShotSSR(D, n_way, n_query, steps, hidden=hidden, device=device).eval().requires_grad_(False)
        M = n_way + n_query
        floor = dni_floor_fn(model.dni_support, E * M, 2 * steps, device, support.dtype)
        with torch.no_grad():
            t_vec, t_floor = timed_pair(lambda: model(support, query), floor, device, args.repeats)
        t_vec, t_floor = t_vec / E, t_floor / E
        n_oracle = min(args.oracle_episodes, E)
        t_oracle = timed_once(
            lambda: [oracle.fewshot_episode(model, support[e], query[e], create_graph=False) for e in range(n_oracle)]
        ) / n_oracle
        rows.append(
            (
                f"few-shot 5w1s, 75 q, D={D}, h={hidden}, steps={steps}, E={E}",
                f"{t_vec * 1e3:.1f} ms/episode",
                f"{t_floor * 1e3:.1f} ms/episode ({t_vec / t_floor:.2f}x)",
                f"{t_oracle * 1e3:.0f} ms/episode ({n_oracle} ep.)",
                "<= 1.5x floor" if steps == 3 else "",
            )
        )
    return rows


def bench_retrieval(args, device) -> list[tuple[str, str, str, str, str]]:
    k, D, hidden, steps, B = 100, 2048, 1024, 1, args.queries
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(B, D, generator=gen).to(device)
    neighbours = torch.randn(B, k, D, generator=gen).to(device)
    torch.manual_seed(0)
    model = RetrievalSSR(D, k, steps, hidden=hidden, device=device).eval().requires_grad_(False)
    floor = dni_floor_fn(model.dni_query, B * (k + 1), 2 * steps, device, query.dtype)
    with torch.no_grad():
        t_vec, t_floor = timed_pair(lambda: model(query, neighbours), floor, device, args.repeats)
    t_vec, t_floor = t_vec / B, t_floor / B
    n_oracle = min(args.oracle_queries, B)
    t_oracle = timed_once(
        lambda: [oracle.retrieval_query(model, query[b], neighbours[b], create_graph=False) for b in range(n_oracle)]
    ) / n_oracle
    return [
        (
            f"retrieval k={k}, D={D}, h={hidden}, steps={steps}, B={B}",
            f"{t_vec * 1e3:.2f} ms/query",
            f"{t_floor * 1e3:.2f} ms/query ({t_vec / t_floor:.2f}x)",
            f"{t_oracle * 1e3:.0f} ms/query ({n_oracle} q.)",
            "<= 5 ms/query",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--episodes", type=int, default=8, help="few-shot episodes per batch")
    parser.add_argument("--queries", type=int, default=64, help="retrieval queries per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best of)")
    parser.add_argument("--oracle-episodes", type=int, default=1)
    parser.add_argument("--oracle-queries", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device: {device_name(device)}; torch {torch.__version__}; float32; torch.no_grad, eval mode\n")
    rows = bench_fewshot(args, device) + bench_retrieval(args, device)
    print("| case | vectorised | floor (DNI matmuls only) | loop oracle | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
