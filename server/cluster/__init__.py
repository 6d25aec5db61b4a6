"""thawed on Ray Serve: many replicas of ``thawed serve`` behind Serve's HTTP proxy.

``thawed serve-cluster CKPT --num-replicas N`` (or the application builder
``thawed.server.cluster.deployment:build_app`` for ``serve run`` and KubeRay's RayService) runs one
engine per Serve replica with the same FastAPI app, routes and ``THAWED_*`` settings as
``thawed serve``. Ray is an optional extra (``pip install 'thawed[cluster]'``): only
``thawed.server.cluster.deployment`` imports it, and the other modules here load without it.

The names below load on first use: Serve's HTTP proxy imports ``thawed.server.cluster.proxy`` (its
middleware) while Serve waits 5 s per readiness check, so that import must not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import ClusterSettings, deployment_options

__all__ = ["ClusterSettings", "deployment_options"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'thawed.server.cluster' has no attribute {name!r}")
