"""``thawed serve-cluster CKPT``: the same server on Ray Serve, many replicas behind Serve's proxy.

This module is the ``thawed`` console script: it extends ``thawed.server.cli.build_parser()``
with ``serve-cluster`` as that one extends the runtime's. Ray is imported only when the command
runs, so ``thawed`` works without the ``cluster`` extra.

Every ``thawed serve`` flag and ``THAWED_*`` variable applies to each replica; ``--host/--port``
are the address of Serve's HTTP proxy. The cluster flags are also ``THAWED_*`` variables.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from thawed.codecs.errors import ThawedError
from thawed.server import cli as server_cli

from .proxy import CALLBACK_ENV, CALLBACK_PATH

READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"

__all__ = ["main", "build_parser", "cluster_settings_from_args", "serve_cluster"]

log = logging.getLogger("thawed")

_CLUSTER_FLAGS = [
    ("--num-replicas", "num_replicas", int, "replicas, each with its own engine (default 1) [THAWED_NUM_REPLICAS]"),
    ("--min-replicas", "min_replicas", int, "autoscaling: fewest replicas (default 1) [THAWED_MIN_REPLICAS]"),
    ("--max-replicas", "max_replicas", int,
     "autoscaling: most replicas; turns autoscaling on (not with --num-replicas) [THAWED_MAX_REPLICAS]"),
    ("--target-ongoing-requests", "target_ongoing_requests", float,
     "autoscaling: requests in flight per replica Serve aims for (default 4) [THAWED_TARGET_ONGOING_REQUESTS]"),
    ("--replica-cpus", "replica_cpus", float, "CPUs reserved per replica (default 1) [THAWED_REPLICA_CPUS]"),
    ("--replica-gpus", "replica_gpus", float,
     "GPUs reserved per replica (default 0; 1 to decode on a GPU) [THAWED_REPLICA_GPUS]"),
    ("--max-ongoing-requests", "max_ongoing_requests", int,
     "requests Serve sends one replica at once (default max-running + max-queue) [THAWED_MAX_ONGOING_REQUESTS]"),
    ("--health-check-period", "health_check_period", float,
     "seconds between health checks of a replica (default 5) [THAWED_HEALTH_CHECK_PERIOD]"),
    ("--health-check-timeout", "health_check_timeout", float,
     "seconds before an unanswered health check restarts the replica (default 30) [THAWED_HEALTH_CHECK_TIMEOUT]"),
    ("--ray-address", "ray_address", str,
     "Ray cluster to join: auto or HOST:PORT (default: start a local one) [THAWED_RAY_ADDRESS]"),
    ("--app-name", "app_name", str, "Serve application name (default thawed) [THAWED_APP_NAME]"),
]


def add_serve_cluster_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve-cluster", help="serve a checkpoint on Ray Serve: replicas, routing, autoscaling, failover",
        description="Serve a thawed checkpoint on Ray Serve (pip install 'thawed[cluster]'). Same routes and "
                    "THAWED_* settings as `thawed serve`; --host/--port are Serve's HTTP proxy. Every node must "
                    "see the checkpoint at the same path (a local copy, NFS, or a Kubernetes volume).")
    p.add_argument("ckpt", nargs="?", default=argparse.SUPPRESS,
                   help="checkpoint directory, at the same path on every node [THAWED_CHECKPOINT]")
    for flag, dest, typ, help_ in server_cli._SERVE_FLAGS:
        if dest in ("host", "port"):
            help_ = help_.replace("address to bind", "address of Serve's HTTP proxy").replace(
                "port (default 8000; 0 = any free port)", "port of Serve's HTTP proxy (default 8000)")
        p.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_)
    for flag, dest, typ, help_ in _CLUSTER_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_)
    server_cli.add_serve_switches(p, preload_help="decode every layer before a replica takes traffic")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = server_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    add_serve_cluster_parser(sub)
    return parser


def cluster_settings_from_args(args: argparse.Namespace):
    from .settings import ClusterSettings

    given = {dest: getattr(args, dest) for _, dest, _, _ in _CLUSTER_FLAGS if hasattr(args, dest)}
    try:
        return ClusterSettings(**given)
    except ValidationError as exc:
        raise server_cli.settings_error(exc, "serve-cluster") from None


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ThawedError("serve-cluster needs Ray Serve, which is not installed: "
                          "pip install 'thawed[cluster]' (or pip install 'ray[serve]')") from None
    return ray, serve


@contextmanager
def _environ(values: dict[str, str]):
    """``os.environ.update(values)`` for the duration (the processes Ray starts inherit it)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_cluster(settings, cluster, stop: threading.Event | None = None,
                  ready: threading.Event | None = None) -> int:
    """Start (or join) a Ray cluster, deploy the replicas, wait until they are loaded (then set
    ``ready``), serve until ``stop`` is set (or SIGINT/SIGTERM); the application is deleted on the way out."""
    if not settings.checkpoint:
        raise ThawedError("no checkpoint given: `thawed serve-cluster CKPT` or set THAWED_CHECKPOINT")
    ckpt = Path(settings.checkpoint).resolve()
    if not ckpt.exists():
        raise ThawedError(f"checkpoint {settings.checkpoint} does not exist; every node must see it at the same "
                          "path (a local copy, NFS, or a Kubernetes volume)")
    if settings.port == 0:
        raise ThawedError("serve-cluster needs a fixed --port (THAWED_PORT) for Serve's HTTP proxy; 0 is not one")
    settings = settings.model_copy(update={"checkpoint": str(ckpt)})  # replicas run in other working dirs
    from .settings import deployment_options

    deployment_options(cluster, settings)  # bad combinations fail before Ray is imported
    ray, serve = _import_ray()
    from .deployment import thawed_application
    started_ray = not ray.is_initialized()
    if started_ray:
        if cluster.ray_address is None:
            # Serve's proxy in a cluster started here inherits this environment (read when Ray starts):
            # it ends the streams of a replica that dies with an error event; and on a loaded machine
            # its start can outlast Serve's 5 s readiness check three times (then Serve kills it and
            # serve.start fails), so a cluster started here waits 30 s per check unless told otherwise
            with _environ({CALLBACK_ENV: os.environ.get(CALLBACK_ENV) or CALLBACK_PATH,
                           READY_ENV: os.environ.get(READY_ENV) or "30"}):
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            if os.environ.get(CALLBACK_ENV) != CALLBACK_PATH:
                log.warning("joining %s: set %s=%s on every node for clean stream errors when a replica dies",
                            cluster.ray_address, CALLBACK_ENV, CALLBACK_PATH)
            ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
    stop = stop or threading.Event()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        log.info("deploying %s on Ray Serve; replicas take traffic once their model is loaded", ckpt)
        serve.run(thawed_application(settings, cluster), name=cluster.app_name, route_prefix="/")
        log.info("serving %s on http://%s:%d (Ray Serve, %s)", ckpt, settings.host, settings.port,
                 f"autoscaling {cluster.min_replicas or 1}..{cluster.max_replicas}" if cluster.autoscaling
                 else f"{cluster.num_replicas or 1} replica(s)")
        if ready is not None:
            ready.set()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        local = started_ray and cluster.ray_address is None
        try:
            serve.delete(cluster.app_name)
            if local:  # on a cluster we joined, Serve may run other applications: leave it up
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()  # stops a local cluster; disconnects from one we joined
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command != "serve-cluster":
        return server_cli.main(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = server_cli.settings_from_args(args)
        logging.getLogger("thawed").setLevel("DEBUG" if settings.log_level == "trace"
                                             else settings.log_level.upper())
        return serve_cluster(settings, cluster_settings_from_args(args))
    except ThawedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
