"""Where the pipeline's services are: local defaults, or existing ones from the environment.

Nothing here runs at import. ``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI`` and
``PREFECT_API_URL`` switch to existing services; without them Ray starts locally sized to
the machine, and MLflow uses SQLite in the run folder.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

from ssr_tasks.config import default_run_dir


class ServiceUnreachable(RuntimeError):
    """A configured service did not answer."""


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host`` (for logs and params)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tcp(url: str, timeout: float = 5.0, what: str = "service") -> None:
    """Fail within ``timeout`` seconds with the URL named when nothing listens there."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ServiceUnreachable(f"{what} at {redact_uri(url)} is unreachable: {exc}") from None


def mlflow_tracking_uri(run_dir: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` or SQLite in the run folder (tracking and registry)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    run_dir = run_dir or default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def mlflow_artifact_root(run_dir: Path | None = None) -> str:
    return ((run_dir or default_run_dir()) / "mlartifacts").as_uri()


def check_mlflow(uri: str, timeout: float = 5.0) -> None:
    if uri.startswith(("http://", "https://")):
        check_tcp(uri, timeout, what="MLflow tracking server")


def init_ray(num_cpus: int | None = None, object_store_mb: int = 512) -> dict:
    """Connect to ``RAY_ADDRESS`` or start a local Ray instance.

    Returns ``ray.cluster_resources()``. A local instance keeps Ray's token authentication
    (the default) and leaves the dashboard off. Ray 2.60 replaces the 127.0.0.1 node
    address by the machine's address and its gRPC servers listen on all interfaces; the
    token is what keeps other hosts out (docs/reliability.md, security).
    """
    import ray  # lazy: Ray is heavy: the CLI and the MLflow helpers here must not pay for it

    if ray.is_initialized():
        return ray.cluster_resources()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "://" not in address and address != "auto":
            check_tcp(f"tcp://{address}", what="Ray cluster")
        ray.init(address=address, log_to_driver=False)
    else:
        ncpu = num_cpus or (os.cpu_count() or 1)
        ray.init(
            num_cpus=ncpu,
            include_dashboard=False,
            object_store_memory=object_store_mb * 1024 * 1024,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    return ray.cluster_resources()


def cluster_has_gpu() -> bool:
    """Decide GPU requests from the cluster (asking for a GPU that is not there hangs)."""
    import ray  # lazy: Ray, see init_ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def pool_size(requested: int, use_gpu: bool) -> int:
    """Actors for a pool: one per GPU, else one per CPU minus one of headroom."""
    import ray  # lazy: Ray, see init_ray

    if requested > 0:
        return requested
    res = ray.cluster_resources()
    if use_gpu:
        return max(1, int(res.get("GPU", 1)))
    return max(1, int(res.get("CPU", 1)) - 1)
