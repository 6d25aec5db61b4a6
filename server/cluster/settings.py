"""Cluster settings: how many replicas, what each one reserves, where Serve's proxy listens.

The model settings stay ``thawed.server.Settings`` (every ``THAWED_*`` of ``thawed serve``); these
are the few that only a cluster has, read from flags or ``THAWED_*`` variables the same way.
``deployment_options`` turns both into the keyword arguments of Serve's ``Deployment.options``;
it is plain Python, so it is tested without Ray.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from thawed.codecs.errors import ThawedError

__all__ = ["ClusterSettings", "deployment_options", "CLUSTER_FIELDS"]


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAWED_", frozen=True, extra="ignore")

    num_replicas: int | None = Field(None, ge=1, description="fixed number of replicas (default 1; "
                                     "not with --max-replicas)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: fewest replicas (default 1)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas; setting it turns "
                                     "autoscaling on")
    target_ongoing_requests: float = Field(4.0, gt=0, description="autoscaling: requests in flight per replica "
                                           "that Serve aims for")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica (also its torch threads)")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica (1 for THAWED_DEVICE=cuda)")
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests Serve sends one replica at once "
                                             "(default: max_running + max_queue, so the engine's 429 is kept)")
    health_check_period: float = Field(5.0, gt=0, description="seconds between Serve's health checks of a replica")
    health_check_timeout: float = Field(30.0, gt=0, description="seconds a health check may take before the "
                                        "replica counts as dead")
    ray_address: str | None = Field(None, description="Ray cluster to join (`auto`, HOST:PORT); "
                                    "default: start a local one")
    app_name: str = Field("thawed", min_length=1, description="Serve application name")

    @model_validator(mode="after")
    def _one_way_to_size(self) -> "ClusterSettings":
        if self.max_replicas is not None:
            if self.num_replicas is not None:
                raise ValueError("give either num_replicas (a fixed count) or max_replicas (autoscaling), not both")
            low = 1 if self.min_replicas is None else self.min_replicas
            if low > self.max_replicas:
                raise ValueError(f"min_replicas {low} is more than max_replicas {self.max_replicas}")
        elif self.min_replicas is not None:
            raise ValueError("min_replicas needs max_replicas (autoscaling); for a fixed count use num_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


CLUSTER_FIELDS = frozenset(ClusterSettings.model_fields)


def deployment_options(cluster: ClusterSettings, settings: Any) -> dict[str, Any]:
    """Keyword arguments for ``Deployment.options``: replica count or autoscaling, per-replica
    resources, concurrency and health checks. ``settings`` is the replicas' ``thawed.server.Settings``."""
    device = str(settings.device)
    if device.startswith("cuda") and cluster.replica_gpus <= 0:
        raise ThawedError(f"THAWED_DEVICE={device} but each replica reserves no GPU: Ray hides every GPU from it; "
                          "give --replica-gpus 1 (THAWED_REPLICA_GPUS) or --device auto")
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
        "max_ongoing_requests": cluster.max_ongoing_requests or settings.max_running + settings.max_queue,
        "health_check_period_s": cluster.health_check_period,
        "health_check_timeout_s": cluster.health_check_timeout,
    }
    if cluster.autoscaling:
        low = 1 if cluster.min_replicas is None else cluster.min_replicas
        opts["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1),
                                      "max_replicas": cluster.max_replicas,
                                      "target_ongoing_requests": cluster.target_ongoing_requests}
    else:
        opts["num_replicas"] = cluster.num_replicas or 1
    return opts
