"""Speed and memory of the exact SSR models against the authors' code and the DNI floor.
Prints a Markdown table. Not a test.

    python benchmarks/bench_ssr_model.py --authors-src ~/src/SSR      # CPU, 2 threads
    python benchmarks/bench_ssr_model.py --device cuda --authors-src ~/src/SSR

``--authors-src`` is a checkout of https://github.com/XiSHEN0220/SSR (MIT). Its few-shot
and retrieval ``ssr.py`` are imported from there at run time, never copied into this
project; they are given the same weights as ours (strict ``load_state_dict``). Their code
calls ``.cuda()`` unconditionally; on a CPU run this script makes ``Tensor.cuda`` a no-op
for the duration of their calls. Without ``--authors-src`` their column is left empty.

Cases (float32, median of ``--repeats`` timed runs after one warm-up, contenders run
alternately so that load from other processes hits all of them alike; ``--clock cpu``
times this process's CPU time instead of wall time, which is steadier on a shared machine
when run with ``--threads 1``):

* few-shot inference: 5-way 1-shot, 75 queries, D=640, hidden 4096, steps 1 and 3, E
  episodes per batch, under ``torch.no_grad()``: ms per episode. The authors' call is one
  episode at a time (features with ``requires_grad``, as in their ``few_shot_test.py``).
* retrieval inference: k=100, D=2048, hidden 1024, steps 1, B queries per batch: ms per
  query; the authors' call is one query at a time.
* few-shot training step: one episode, steps 3, forward + cross-entropy + backward + SGD
  step: ms per step, both sides.
* peak memory: growth of the process's peak RSS over its RSS before the call (CPU,
  Linux: the peak is reset through /proc/self/clear_refs) or of
  ``torch.cuda.max_memory_allocated`` (CUDA) during one batched inference call, per
  episode / query, each measured in a fresh child process.

Floors, timed on the same rows with the models' own DNI modules:

* exact floor: what the total derivative needs. Half-step i of the refinement
  differentiates through every earlier update (SSR_METHOD.md 3.4), which costs one pass
  through each earlier DNI, so ``s`` steps need ``2s`` DNI forwards and ``s(2s-1)``
  vector-Jacobian passes (3 steps: 6 + 15). Autograd runs exactly these; the profiler
  count is printed with ``--count-passes``.
* "6 + 5" floor: ``2s`` forwards and ``2s-1`` input-gradient passes, the count the
  issue started from; shown for reference, it is below what the exact function needs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssr_model.fewshot import FewShotSSR  # noqa: E402
from ssr_model.losses import fewshot_cross_entropy  # noqa: E402
from ssr_model.retrieval import RetrievalSSR  # noqa: E402

FEWSHOT = {"n_way": 5, "n_shot": 1, "n_query": 75, "feat_dim": 640, "hidden": 4096}
RETRIEVAL = {"k": 100, "feat_dim": 2048, "hidden": 1024, "steps": 1}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock in main()


def median_times(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each callable, all run alternately (one round per
    repeat) after one warm-up each, so that load from other processes hits all alike.
    ``fns`` maps a name to ``(callable, divisor)``; each time is divided by its divisor
    (episodes or queries per call)."""
    for fn, _ in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, divisor) in fns.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append((clock() - start) / divisor)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- authors' code


@contextlib.contextmanager
def authors_device(device: torch.device):
    """Their modules call ``.cuda()`` unconditionally: on CPU make it return the tensor."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def import_authors_module(path: Path, name: str):
    """Import one of the authors' ``ssr.py`` files under a unique module name."""
    sys.path.insert(0, str(path.parent))  # few-shot ssr.py imports its sibling networks.py
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def authors_fewshot(src: Path, ours: FewShotSSR, device: torch.device):
    module = import_authors_module(src / "transductive_few_shot" / "src" / "ssr.py", "authors_fewshot_ssr")
    with authors_device(device):
        net = module.SSR(
            feat_dim=ours.feat_dim, q_steps=ours.steps, nb_cls=ours.n_way, nb_qry=ours.n_query,
            lr_dni=ours.lr_dni, dni_hidden_size=ours.dni_support.hidden,
        )  # fmt: skip
    net.load_state_dict(ours.state_dict(), strict=True)
    return net.to(device)


def authors_retrieval(src: Path, ours: RetrievalSSR, device: torch.device):
    module = import_authors_module(src / "image_retrieval" / "ssr.py", "authors_retrieval_ssr")
    with authors_device(device):
        net = module.SSR(
            feat_dim=ours.feat_dim, q_steps=ours.steps, k=ours.k, lr_dni=ours.lr_dni,
            dni_hidden_size=ours.dni_query.hidden,
        )  # fmt: skip
    net.load_state_dict(ours.state_dict(), strict=True)
    return net.to(device)


def authors_fewshot_episode(net, support: torch.Tensor, query: torch.Tensor, device) -> torch.Tensor:
    """Their inference call (their val/test loop: features with requires_grad, grad on)."""
    with authors_device(device), torch.enable_grad():
        return net(support.detach().requires_grad_(True), query.detach().requires_grad_(True)).detach()


def authors_retrieval_query(net, query: torch.Tensor, database: torch.Tensor, device) -> torch.Tensor:
    with authors_device(device), torch.enable_grad():
        return net(query.detach()[None].requires_grad_(True), database.detach().requires_grad_(True)).detach()


# ----------------------------------------------------------------------------- floors


def dni_floor(dnis, rows: torch.Tensor, n_forward: int, n_vjp: int):
    """Callable running ``n_forward`` DNI forwards and ``n_vjp`` input-gradient passes on
    ``rows`` (N, d_in), alternating the given DNIs. The VJP graphs are built beforehand, so
    only the backward passes are timed."""
    graphs = []
    with torch.enable_grad():
        for dni in dnis:
            x = rows.detach().clone().requires_grad_(True)
            graphs.append((x, dni(x)))
    upstream = torch.randn_like(rows)

    def run():
        with torch.no_grad():
            for i in range(n_forward):
                dnis[i % len(dnis)](rows)
        for i in range(n_vjp):
            x, y = graphs[i % len(graphs)]
            torch.autograd.grad(y, x, upstream, retain_graph=True)

    return run


def dni_matmul_floor(dni, rows: torch.Tensor, n_passes: int):
    """Callable running only the three Linear layers of the DNI ``n_passes`` times."""
    fc1, fc2, fc3 = dni.layer1[1], dni.layer2[0], dni.layer3

    def run():
        with torch.no_grad():
            for _ in range(n_passes):
                F.linear(F.linear(F.linear(rows, fc1.weight, fc1.bias), fc2.weight, fc2.bias), fc3.weight, fc3.bias)

    return run


def exact_passes(steps: int) -> tuple[int, int]:
    """(DNI forwards, vector-Jacobian passes) of the exact refinement with ``steps`` steps."""
    return 2 * steps, steps * (2 * steps - 1)


# ----------------------------------------------------------------------------- cases


def fewshot_inputs(E: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = FEWSHOT
    support = torch.randn(E, c["n_way"], c["n_shot"], c["feat_dim"], generator=gen).to(device)
    query = torch.randn(E, c["n_query"], c["feat_dim"], generator=gen).to(device)
    labels = torch.randint(0, c["n_way"], (E, c["n_query"]), generator=gen).to(device)
    return support, query, labels


def fewshot_model(steps: int, device) -> FewShotSSR:
    torch.manual_seed(0)
    c = FEWSHOT
    return FewShotSSR(c["feat_dim"], c["n_way"], c["n_query"], steps, hidden=c["hidden"], device=device)


def retrieval_inputs(B: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, RETRIEVAL["feat_dim"], generator=gen).to(device)
    neighbours = torch.randn(B, RETRIEVAL["k"], RETRIEVAL["feat_dim"], generator=gen).to(device)
    return query, neighbours


def retrieval_model(device) -> RetrievalSSR:
    torch.manual_seed(0)
    c = RETRIEVAL
    return RetrievalSSR(c["feat_dim"], c["k"], c["steps"], hidden=c["hidden"], device=device)


def bench_inference(args, device, ours, authors_call, dnis, rows: torch.Tensor, steps: int, batch: int) -> dict:
    """Time ``ours()`` (a batch of ``batch`` episodes / queries), the floors on ``rows`` and,
    if given, ``authors_call(first_only)`` (one episode / query); also their largest output
    difference relative to the authors' scale (from the first item of the batch)."""
    n_fwd, n_vjp = exact_passes(steps)
    fns = {
        "ours": (ours, batch),
        "exact floor": (dni_floor(dnis, rows, n_fwd, n_vjp), batch),
        "6+5 floor": (dni_floor(dnis, rows, n_fwd, n_fwd - 1), batch),
        "matmul floor": (dni_matmul_floor(dnis[0], rows, n_fwd + n_vjp), batch),
    }
    check = None
    if authors_call is not None:
        with torch.no_grad():
            ours_out = ours(first_only=True)
        theirs_out = authors_call()
        check = (ours_out - theirs_out).abs().max().item() / theirs_out.abs().max().item()
        fns["authors"] = (authors_call, 1)
    with torch.no_grad():
        times = median_times(fns, device, args.repeats)
    if check is not None:
        times["check"] = check
    return times


def bench_fewshot_inference(args, device, steps: int) -> dict:
    E = args.episodes
    model = fewshot_model(steps, device).eval()
    support, query, _ = fewshot_inputs(E, device)
    rows = torch.randn(E * (FEWSHOT["n_way"] + FEWSHOT["n_query"]), model.d_in, device=device)

    def ours(first_only: bool = False):
        return model(support[0], query[0]) if first_only else model(support, query)

    authors_call = None
    if args.authors_src:
        authors = authors_fewshot(args.authors_src, model, device).eval()

        def authors_call():
            return authors_fewshot_episode(authors, support[0], query[0], device)

    times = bench_inference(args, device, ours, authors_call, [model.dni_support, model.dni_query], rows, steps, E)
    return {"case": f"few-shot inference 5w1s, 75 q, D=640, h=4096, steps={steps}, E={E}", "unit": "episode", **times}


def bench_retrieval_inference(args, device) -> dict:
    B = args.queries
    model = retrieval_model(device).eval()
    query, neighbours = retrieval_inputs(B, device)
    rows = torch.randn(B * (1 + RETRIEVAL["k"]), model.d_in, device=device)

    def ours(first_only: bool = False):
        return model(query[0], neighbours[0]) if first_only else model(query, neighbours)

    authors_call = None
    if args.authors_src:
        authors = authors_retrieval(args.authors_src, model, device).eval()

        def authors_call():
            return authors_retrieval_query(authors, query[0], neighbours[0], device)

    dnis = [model.dni_query, model.dni_database]
    times = bench_inference(args, device, ours, authors_call, dnis, rows, RETRIEVAL["steps"], B)
    k, D, h, s = RETRIEVAL["k"], RETRIEVAL["feat_dim"], RETRIEVAL["hidden"], RETRIEVAL["steps"]
    return {"case": f"retrieval inference k={k}, D={D}, h={h}, steps={s}, B={B}", "unit": "query", **times}


def bench_fewshot_train_step(args, device, steps: int = 3) -> dict:
    model = fewshot_model(steps, device).train()
    support, query, labels = fewshot_inputs(1, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat sees the same weights

    def ours():
        optimizer.zero_grad()
        fewshot_cross_entropy(model(support, query), labels).backward()
        optimizer.step()

    fns = {"ours": (ours, 1)}
    if args.authors_src:
        authors = authors_fewshot(args.authors_src, model, device).train()
        authors_optimizer = torch.optim.SGD(authors.parameters(), lr=0.0)

        def theirs():
            authors_optimizer.zero_grad()
            with authors_device(device):
                scores = authors(support[0].detach().requires_grad_(True), query[0].detach().requires_grad_(True))
            F.cross_entropy(scores, labels[0]).backward()
            authors_optimizer.step()

        fns["authors"] = (theirs, 1)
    times = median_times(fns, device, args.repeats)
    return {"case": f"few-shot training step, 1 episode, steps={steps}, D=640, h=4096", "unit": "step", **times}


def peak_memory_child(case: str, device: torch.device, batch: int) -> float:
    """Run in a fresh process: bytes of peak-memory growth during one inference call."""
    if case == "fewshot":
        model = fewshot_model(3, device).eval()
        inputs = fewshot_inputs(batch, device)[:2]
    else:
        model = retrieval_model(device).eval()
        inputs = retrieval_inputs(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
        with torch.no_grad():
            model(*inputs)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = proc_status_kib("VmRSS")
    with torch.no_grad():
        model(*inputs)
    return float(proc_status_kib("VmHWM") - before) * 1024


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no field {field}")


def peak_memory(case: str, args, batch: int) -> float:
    """MiB of peak-memory growth per episode / query, measured in a child process."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak-memory-child", case, "--device", args.device, "--batch", str(batch),
         "--threads", str(args.threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"] / batch / 2**20


def count_dni_passes(device) -> str:
    """Profiler count of the hidden x hidden matmuls in one 3-step few-shot inference."""
    model = fewshot_model(3, device).eval()
    support, query, _ = fewshot_inputs(1, device)
    with torch.profiler.profile(record_shapes=True) as prof, torch.no_grad():
        model(support, query)
    h = FEWSHOT["hidden"]
    n = sum(
        e.count
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::mm", "aten::addmm") and any(list(s) == [h, h] or list(s) == [h, h][::-1] for s in e.input_shapes if s)
    )  # fmt: skip
    return f"{n} hidden x hidden matmuls in one 3-step episode (exact count: {sum(exact_passes(3))})"


def fmt_ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--episodes", type=int, default=8, help="few-shot episodes per batch (default 8)")
    parser.add_argument("--queries", type=int, default=32, help="retrieval queries per batch (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    parser.add_argument("--authors-src", type=Path, help="checkout of github.com/XiSHEN0220/SSR")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall (default) or cpu: this process's CPU time, steadier on a shared machine with --threads 1",
    )  # fmt: skip
    parser.add_argument("--count-passes", action="store_true", help="profile the DNI passes of one episode")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--peak-memory-child", choices=["fewshot", "retrieval"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    global clock
    clock = CLOCKS[args.clock]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.peak_memory_child:
        print(json.dumps({"bytes": peak_memory_child(args.peak_memory_child, device, args.batch)}))
        return

    print(
        f"device: {device_name(device)}; torch {torch.__version__}; float32; median of {args.repeats}; "
        f"{args.clock} clock; load average {os.getloadavg()[0]:.1f} at the start\n"
    )
    if args.count_passes:
        print(count_dni_passes(device) + "\n")
    rows = [
        bench_fewshot_inference(args, device, 1),
        bench_fewshot_inference(args, device, 3),
        bench_retrieval_inference(args, device),
        bench_fewshot_train_step(args, device),
    ]
    if not args.skip_memory:
        rows[1]["memory"] = peak_memory("fewshot", args, args.episodes)
        rows[2]["memory"] = peak_memory("retrieval", args, args.queries)

    print(
        "| case | ours | authors | speed-up | exact floor (x) | 6+5 floor (x) | DNI matmuls only | "
        "peak memory | |ours - authors| / max |authors| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        unit, ours, authors = row["unit"], row["ours"], row.get("authors")

        def versus(key: str) -> str:
            return "" if key not in row else f"{fmt_ms(row[key])} ({ours / row[key]:.2f}x)"

        cells = [
            row["case"],
            f"{fmt_ms(ours)}/{unit}",
            "" if authors is None else f"{fmt_ms(authors)}/{unit}",
            "" if authors is None else f"{authors / ours:.1f}x",
            versus("exact floor"),
            versus("6+5 floor"),
            versus("matmul floor"),
            f"{row['memory']:.0f} MiB/{unit}" if "memory" in row else "",
            f"{row['check']:.1e}" if "check" in row else "",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
