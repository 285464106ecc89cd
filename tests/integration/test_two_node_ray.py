"""A two-node Ray cluster on this machine: the re-ranking actor pool spreads over both nodes.

Two ``ray start`` processes (head: 1 CPU and resource ``node_a``; worker: 1 CPU and
``node_b``) with their own temp folder form the cluster; a separate Python process with
``RAY_ADDRESS`` set runs ``rerank_store`` with 2 actors (the session's own Ray instance
belongs to the pytest process). Each actor is one CPU, so the two land on different nodes.
The cluster is stopped by the PIDs of its own processes, never with ``ray stop`` (which
would stop every Ray instance of the machine, the session's and other users' included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import numpy as np
    import ray
    import torch

    import ssr_tasks.retrieval.rerank as rr
    from ssr_tasks.retrieval.handoffs import RetrievalModel
    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.services import init_ray
    from storage.features import write_features
    from storage.simstore import SimilarityStore, build_topk_store

    work = Path(sys.argv[1])
    NODES = work / "nodes"
    NODES.mkdir()

    class Traced(rr.ShardReranker):
        """The product's worker, recording on which node each actor and shard ran."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.node = ray.get_runtime_context().get_node_id()
            (NODES / f"actor-{self.node}").write_text(self.node)

        def rerank_shard(self, store_dir, query_features, out_dir, shard):
            (NODES / f"shard-{shard}").write_text(self.node)
            return super().rerank_shard(store_dir, query_features, out_dir, shard)

    rr.ShardReranker = Traced
    resources = init_ray()
    rng = np.random.default_rng(0)
    db = rng.normal(size=(60, 8)).astype(np.float32)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    meta = {"dataset": "t", "backbone": "t", "checkpoint_hash": "-"}
    write_features(work / "db.parquet", ids=np.arange(60), labels=[0] * 60, splits="database", embeddings=db, metadata=meta)
    write_features(work / "q.parquet", ids=np.arange(20), labels=[0] * 20, splits="query", embeddings=q, metadata=meta)
    build_topk_store(q, np.arange(20), db, np.arange(60), work / "topk", 10, shard_size=5)
    cfg = RetrievalTrainParams(k=6, steps=1, lr_dni=0.5, hidden=8)
    torch.save(cfg.build(8).state_dict(), work / "model.pt")
    model = RetrievalModel(str(work / "model.pt"), cfg, 8)
    out = rr.rerank_store(work / "topk", work / "q.parquet", work / "db.parquet", work / "out", model, n_actors=2)
    store = SimilarityStore(out)
    qids = sorted(int(i) for s in store.iter_shards() for i in s.query_ids)
    print(json.dumps({
        "resources": {k: v for k, v in resources.items() if k in ("CPU", "node_a", "node_b")},
        "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "actor_nodes": sorted(p.read_text() for p in NODES.glob("actor-*")),
        "shard_nodes": {p.name: p.read_text() for p in NODES.glob("shard-*")},
        "complete": store.is_complete(), "query_ids": qids,
    }))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def cluster_pids(temp_dir: str) -> set[int]:
    """Processes of the cluster rooted in ``temp_dir``: those naming it on their command line, and their descendants."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    procs[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                pass
    roots = {pid for pid, cmd in procs.items() if temp_dir in cmd and pid != os.getpid()}
    found = set(roots)
    for pid in procs:
        p = pid
        for _ in range(20):
            p = _parent(p)
            if p in roots:
                found.add(pid)
                break
            if p <= 1:
                break
    return found


def stop_cluster(temp_dir: str, timeout: float = 30.0) -> None:
    """SIGTERM the cluster's processes, then SIGKILL what is left (again, if some were still starting)."""
    sig, deadline = signal.SIGTERM, time.time() + timeout
    while time.time() < deadline:
        pids = cluster_pids(temp_dir)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
        sig = signal.SIGKILL


@pytest.mark.slow
@pytest.mark.services
def test_actor_pool_uses_both_nodes_of_a_two_node_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # every node and the driver present the token (~/.ray/auth_token here)
    common = ["--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        head = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--resources",
                '{"node_a": 1}',
                "--include-dashboard",
                "false",
                *common,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        worker = subprocess.run(
            [
                RAY,
                "start",
                "--address",
                f"127.0.0.1:{port}",
                "--node-ip-address",
                "127.0.0.1",
                "--resources",
                '{"node_b": 1}',
                *common,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
        script = tmp_path / "two_nodes.py"
        script.write_text(SCRIPT)
        run = subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=420,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)},
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        res = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        stop_cluster(temp_dir)
    assert res["resources"] == {"CPU": 2.0, "node_a": 1.0, "node_b": 1.0}
    assert len(res["nodes"]) == 2
    assert res["actor_nodes"] == res["nodes"]  # one actor on each node
    assert set(res["shard_nodes"]) == {f"shard-{i}" for i in range(4)}
    assert res["complete"] and res["query_ids"] == list(range(20))
    assert not cluster_pids(temp_dir)
