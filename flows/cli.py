"""The ``ssr`` command line.

ssr data prepare glyphs|download|import-landmarks ...   data sets (storage)
ssr services start|stop                                   local Prefect server, worker, MLflow UI
ssr run fewshot|retrieval [--preset NAME] [--set k=v]     run a pipeline in-process, no server needed
ssr rerank QUERIES DATABASE --model URI --out DIR         re-rank your own features with a registered model
ssr watch FLOW_RUN_ID                                     follow a flow run: step, progress, latest log line
ssr models                                                registered models, versions and aliases
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from flows import local_services
from ssr_tasks.config import FewShotParams, RetrievalParams, default_run_dir
from ssr_tasks.registry import registered_models
from ssr_tasks.services import ServiceUnreachable, check_mlflow, check_tcp, mlflow_tracking_uri, redact_uri
from storage import cli as storage_cli

PRESETS_FILE = Path(__file__).resolve().parent.parent / "deploy" / "prefect.yaml"


def presets() -> dict[str, dict]:
    """Deployment parameter presets from deploy/prefect.yaml, by deployment name."""
    doc = yaml.safe_load(PRESETS_FILE.read_text())
    return {d["name"]: d.get("parameters", {}) for d in doc.get("deployments", [])}


class UsageError(ValueError):
    """A bad command line: one line, exit 2."""


def _parse_sets(items: list[str], flat: Mapping[str, tuple[str, str]]) -> dict:
    """``--set group.field=value`` (or a deprecated flat ``field=value``) as nested parameters.
    Values are JSON when they parse, else strings."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects group.field=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." not in key and key in flat:
            group, name = flat[key]
            print(f"ssr run: note: --set {key}=... is deprecated; use --set {group}.{name}=...", file=sys.stderr)
            key = f"{group}.{name}"
        *groups, name = key.split(".")
        target = out
        for group in groups:
            target = target.setdefault(group, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {key}: {group} is a value, not a group")
        target[name] = value
    return out


def _merge(base: Mapping, override: Mapping, whole: frozenset[str] = frozenset()) -> dict:
    """``base`` with ``override`` applied field by field; a group in ``whole`` (given as one
    value, ``--set sweep={...}``) replaces the preset's group."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in whole:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _error_line(err: Mapping) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"parameter {loc}: {msg}" if loc else f"parameters: {msg}"


def cmd_run(args) -> int:
    model = FewShotParams if args.pipeline == "fewshot" else RetrievalParams
    base: dict = {}
    try:
        if args.preset:
            table = presets()
            if args.preset not in table:
                raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(table)}")
            base = table[args.preset].get(args.pipeline, {})
        sets = _parse_sets(args.set, model.FLAT)
    except UsageError as exc:
        print(f"ssr run: {exc}", file=sys.stderr)
        return 2
    try:
        params = model(**_merge(base, sets, frozenset(s.partition("=")[0] for s in args.set)))
    except ValidationError as exc:
        for err in exc.errors():
            print(f"ssr run: {_error_line(err)}", file=sys.stderr)
        return 2
    if isinstance(params, FewShotParams):  # bad data or checkpoints: one line and exit 2 before anything starts
        from ssr_tasks.fewshot.inputs import check_inputs  # lazy: `ssr run` only (Prefect and the data stores)

        try:
            check_inputs(params, default_run_dir())
        except (ValueError, OSError) as exc:
            print(f"ssr run: {exc}", file=sys.stderr)
            return 2
    unreachable = _unreachable_services()
    if unreachable:
        print(f"ssr run: {unreachable}", file=sys.stderr)
        return 3
    if isinstance(params, RetrievalParams) and params.data.dataset != "glyphs-retrieval":
        # the authors' pickles are imported (once, cached) before the flow, so bad input is one line
        # lazy: `ssr run retrieval` only (Prefect, Ray and the retrieval tasks)
        from ssr_tasks.retrieval.tasks import check_holdout, data_for_run, import_landmark_data

        try:
            check_holdout(import_landmark_data(data_for_run(params), default_run_dir()), params.train, params.k_max)
        except (ValueError, OSError) as exc:  # storage errors are ValueErrors
            print(f"ssr run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
            return 2
    # lazy: Prefect, torch and the pipelines load only for `ssr run`: the other commands stay quick
    from flows.failures import one_line, quiet_console_tracebacks
    from flows.ssr_flow import ssr

    quiet_console_tracebacks()
    try:
        if isinstance(params, FewShotParams):
            result = ssr(pipeline="fewshot", fewshot=params)
        else:
            result = ssr(pipeline="retrieval", retrieval=params)
    except Exception as exc:  # one line here; the tracebacks are in the Prefect logs of the run
        print(f"ssr run: {one_line(exc)} (traceback in the Prefect logs of the flow run)", file=sys.stderr)
        return 1
    print(result["markdown"])
    print(f"registered model: {result['model_uri']} (aliases moved: {', '.join(result['aliases']) or 'none'})")
    return 0


def _unreachable_services() -> str | None:
    """Servers named by PREFECT_API_URL / MLFLOW_TRACKING_URI that do not answer (checked in seconds).

    Without this, Prefect retries an unreachable API before failing with a long traceback.
    """
    try:
        if os.environ.get("PREFECT_API_URL"):
            check_tcp(os.environ["PREFECT_API_URL"], timeout=5, what="Prefect API (PREFECT_API_URL)")
        if os.environ.get("MLFLOW_TRACKING_URI"):
            check_mlflow(os.environ["MLFLOW_TRACKING_URI"], timeout=5)
    except ServiceUnreachable as exc:
        return str(exc)
    return None


def cmd_rerank(args) -> int:
    unreachable = _unreachable_services()
    if unreachable:
        print(f"ssr rerank: {unreachable}", file=sys.stderr)
        return 3
    # lazy: torch, Ray and MLflow load only for this command
    from ssr_tasks.retrieval.user_rerank import rerank_features

    try:
        out = rerank_features(
            Path(args.queries),
            Path(args.database),
            args.model,
            Path(args.out),
            k=args.k,
            gnd=args.gnd,
            n_actors=args.actors,
            device=args.device,
            shard_size=args.shard_size,
        )
    except ServiceUnreachable as exc:
        print(f"ssr rerank: {exc}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:  # bad input (storage errors are ValueErrors): one line, exit 2
        print(f"ssr rerank: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"top-K store: {out.topk} ({out.n_queries} queries, k={out.k})")
    print(f"re-ranked store: {out.reranked}")
    if out.map_before is not None and out.map_after is not None and args.gnd == "labels":  # label matches: one mAP
        print("(%)       mAP     mP@10    (ground truth: label matches)")
        for label, maps in (("before", out.map_before), ("after", out.map_after)):
            print(f"{label:<9} {maps['medium']:7.2f} {maps['mP@10 medium']:7.2f}")
    elif out.map_before is not None and out.map_after is not None:
        print("mAP (%)    easy    medium  hard")
        for label, maps in (("before", out.map_before), ("after", out.map_after)):
            print(f"{label:<9} {maps['easy']:7.2f} {maps['medium']:7.2f} {maps['hard']:7.2f}")
    return 0


def cmd_services(args) -> int:
    if args.action == "start":
        addrs = local_services.start(worker=not args.no_worker, mlflow_ui=not args.no_mlflow_ui)
        for name, url in addrs.items():
            print(f"{name}: {url}")
    else:
        print("stopped: " + (", ".join(local_services.stop()) or "nothing was running"))
    return 0


def cmd_models(args) -> int:
    uri = mlflow_tracking_uri()
    models = registered_models(uri)
    print(f"registry: {redact_uri(uri)}")
    if not models:
        print("no registered models yet")
    for name, aliases, versions in models:
        listed = ", ".join(f"{a}->v{v}" for a, v in sorted(aliases.items()))
        print(f"{name}: aliases {listed or 'none'}")
        for version, tags in versions:
            print(f"  v{version}  " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    return 0


def cmd_watch(args) -> int:
    from flows.watch import watch  # lazy: Prefect's client loads only for this command

    state = watch(
        args.flow_run_id, interval=args.interval, timeout=args.timeout, out=lambda line: print(line, flush=True)
    )
    return 0 if state == "Completed" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    storage_cli.register(sub)
    p = sub.add_parser("services", help="start or stop the local Prefect server, worker and MLflow UI (127.0.0.1)")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--no-worker", action="store_true", help="do not start a process worker")
    p.add_argument("--no-mlflow-ui", action="store_true", help="do not start the MLflow UI")
    p.set_defaults(func=cmd_services)
    p = sub.add_parser("run", help="run a pipeline in this process (Prefect runs it without a server)")
    p.add_argument("pipeline", choices=["fewshot", "retrieval"])
    p.add_argument("--preset", help="parameters of a deployment in deploy/prefect.yaml, e.g. reproduce-fewshot-tiny")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="override one parameter (JSON value), e.g. train.hidden=512 or sweep.lr_dni=[0.01,0.1]; "
        "a flat FIELD=VALUE still works (deprecated)",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("rerank", help="re-rank your own features with a registered retrieval model (Ray actors)")
    p.add_argument("queries", help="features table (Parquet) of the queries; `ssr data topk` input format")
    p.add_argument("database", help="features table of the database")
    p.add_argument("--model", required=True, help="registered model, e.g. models:/ssr-retrieval@champion")
    p.add_argument("--out", required=True, help="output folder: topk/ (reused when complete) and reranked/")
    p.add_argument(
        "--k", type=int, default=None, help="neighbours per query; must be the model's k (default: the model's k)"
    )
    p.add_argument(
        "--gnd",
        default=None,
        help="revisitop ground truth (JSON or pickle): print mAP E/M/H before and after; "
        "'labels': a database item is positive when its label equals the query's (mAP and mP@10)",
    )
    p.add_argument("--actors", type=int, default=0, help="re-ranking actors (0: one per free CPU, or per GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--shard-size", type=int, default=50_000, help="queries per shard (default: %(default)s)")
    p.set_defaults(func=cmd_rerank)
    p = sub.add_parser("watch", help="follow a flow run: running step, progress and latest log line every few seconds")
    p.add_argument("flow_run_id")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between lines (default 5)")
    p.add_argument("--timeout", type=float, default=5400.0, help="give up after this many seconds")
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser("models", help="registered models, versions, tags and aliases")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Without a server Prefect starts a temporary one; on a busy 2-core machine that takes
    # longer than Prefect's default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ssr_tasks,flows")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
