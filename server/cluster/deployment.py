"""The Ray Serve deployment: one thawed engine per replica, its FastAPI app as Serve's ingress.

Architecture: Serve's HTTP proxy (one per node) -> a replica chosen by Serve's router (power of
two choices over requests in flight) -> that replica's ``create_app`` app -> its engine -> its
lazily decoded model. Every route of ``thawed serve`` (OpenAI, TGI, ``/metrics``, ``/health``)
is served as is; ``/metrics`` reports the replica that answered it.

Entry points:
- ``thawed serve-cluster CKPT ...`` (``thawed.server.cluster.cli``);
- ``build_app(args)``, an application builder for ``serve run thawed.server.cluster.deployment:build_app
  checkpoint=/model num_replicas=2`` and for KubeRay's RayService (``import_path``).

Imports Ray: install it with ``pip install 'thawed[cluster]'``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ray import serve
from ray.serve import Application

from thawed.server import Settings, create_app

from .replica import ReplicaApp, replica_problem
from .settings import CLUSTER_FIELDS, ClusterSettings, deployment_options

__all__ = ["ThawedReplica", "build_app", "thawed_application", "replica_ids", "replica_pid", "running_replicas",
           "wait_replaced"]

log = logging.getLogger(__name__)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (never in Serve)
        return "local"


@serve.deployment(name="thawed")
@serve.ingress()
class ThawedReplica:
    """One engine: the app of ``thawed serve``, built when Serve starts the replica."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        # explicit values from the launcher win; THAWED_* of this replica's node fill the rest
        self._settings = Settings(**settings)
        self._app: ReplicaApp | None = None

    def __serve_build_asgi_app__(self) -> ReplicaApp:
        self._app = ReplicaApp(create_app(self._settings), _replica_id())
        return self._app

    def check_health(self) -> None:
        """Serve's health check is the engine's readiness: a replica whose worker died is restarted."""
        if self._app is None:
            return
        problem = replica_problem(self._app.state)
        if problem is not None:
            raise RuntimeError(f"thawed replica {self._app.replica_id}: {problem}")


def thawed_application(settings: Settings, cluster: ClusterSettings) -> Application:
    """The Serve application: ``ThawedReplica`` with the cluster's sizing and resources."""
    # only what was given (flags or THAWED_*): a default left unset keeps its meaning in the replica
    # (e.g. default_max_tokens from the checkpoint's generation_config.json)
    given = settings.model_dump(exclude_unset=True)
    return ThawedReplica.options(**deployment_options(cluster, settings)).bind(given)


def build_app(args: Mapping[str, Any]) -> Application:
    """Application builder for ``serve run`` and RayService: ``args`` holds any ``thawed serve``
    setting and any ``ClusterSettings`` field (``ray_address`` and ``app_name`` are ignored here)."""
    args = dict(args)
    cluster = ClusterSettings(**{k: v for k, v in args.items() if k in CLUSTER_FIELDS})
    unknown = sorted(k for k in args if k not in CLUSTER_FIELDS and k not in Settings.model_fields)
    if unknown:
        raise ValueError(f"unknown thawed setting(s) {unknown}: use the names of `thawed serve-cluster --help` "
                         "with underscores (e.g. num_replicas, cache_budget)")
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    return thawed_application(settings, cluster)


def _replica_actors(app_name: str | None = None) -> dict[str, tuple[str, str]]:
    """Live Serve replica actors: replica id -> (actor name, namespace)."""
    import ray

    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if not name.startswith("SERVE_REPLICA::"):
            continue
        parts = name[len("SERVE_REPLICA::"):].split("#")  # app#deployment#id
        if app_name is None or (len(parts) == 3 and parts[0] == app_name):
            out[parts[-1]] = (name, entry["namespace"])
    return out


def replica_ids(app_name: str) -> set[str]:
    """Ids of the application's replicas whose actors are alive (starting or running)."""
    return set(_replica_actors(app_name))


def replica_pid(replica_id: str) -> int:
    """The process id of the replica that answers with ``X-Thawed-Replica: replica_id`` (from a
    Ray driver on the cluster: tests and ``benchmarks/cluster.py`` kill it to show failover)."""
    import os

    import ray

    actors = _replica_actors()
    if replica_id not in actors:
        raise LookupError(f"no Serve replica with id {replica_id!r} in this Ray cluster")
    actor = ray.get_actor(*actors[replica_id])
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def running_replicas(app_name: str) -> int:
    """Replicas of the application that Serve reports RUNNING (0 when there is no such application)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def wait_replaced(app_name: str, before: set[str], timeout: float = 300.0) -> tuple[str, float]:
    """Wait until Serve has replaced a replica of ``before`` that died: a replica not in ``before``
    passes its health check (answered only once its startup, i.e. its model load, is done) and
    Serve counts ``len(before)`` replicas RUNNING again (so its routers send it traffic). Returns the
    new replica's id and the seconds waited; raises ``TimeoutError``."""
    import time

    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        actors = _replica_actors(app_name)
        for rid in set(actors) - set(before):
            try:
                ray.get(ray.get_actor(*actors[rid]).check_health.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - still starting (not initialized yet), or gone
                continue
            if running_replicas(app_name) >= len(before):
                return rid, time.monotonic() - t0
        time.sleep(0.25)
    raise TimeoutError(f"Serve started no healthy replacement replica within {timeout:g} s")
