"""thawed on Ray Serve: many replicas of ``thawed serve`` behind Serve's HTTP proxy.

``thawed serve-cluster CKPT --num-replicas N`` (or the application builder
``thawed.server.cluster.deployment:build_app`` for ``serve run`` and KubeRay's RayService) runs one
engine per Serve replica with the same FastAPI app, routes and ``THAWED_*`` settings as
``thawed serve``. Ray is an optional extra (``pip install 'thawed[cluster]'``): only
``thawed.server.cluster.deployment`` imports it, and the other modules here load without it.
"""

from .settings import ClusterSettings, deployment_options

__all__ = ["ClusterSettings", "deployment_options"]
