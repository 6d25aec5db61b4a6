"""The thawed app as one Serve replica runs it.

``ReplicaApp`` wraps the FastAPI app of ``thawed serve`` (``create_app``) and changes two things:
- its lifespan startup completes only when the model is loaded (or fails with the load error), so
  Serve marks the replica running, and routes traffic to it, only once it can answer;
- every HTTP response carries ``X-Thawed-Replica: <id>``, so a client can see which replica
  answered (the per-replica counts in the tests and in ``benchmarks/cluster.py``).

Pure ASGI, no Ray import: tested without Ray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["ReplicaApp", "REPLICA_HEADER", "replica_problem"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-thawed-replica"


def replica_problem(state: Any) -> str | None:
    """Why this replica cannot serve (``None`` when it can): the engine's readiness, as ``/health`` says it."""
    if state.status == "ready" and state.engine is not None and state.engine.alive:
        return None
    if state.status == "loading":
        return "the model is still loading"
    if state.status == "failed":
        return f"the model failed to load: {state.error}"
    if state.status == "ready":
        return "the generation worker has stopped"
    return "the replica is shutting down"


class ReplicaApp:
    """ASGI wrapper: readiness-gated lifespan startup and a replica header on every response."""

    def __init__(self, app: Any, replica_id: str, poll: float = 0.05) -> None:
        self.app = app
        self.state = app.state.thawed
        self.replica_id = replica_id
        self._header = (REPLICA_HEADER.encode(), replica_id.encode())
        self._poll = poll

    def __getattr__(self, name: str) -> Any:  # Serve adds its exception handlers to the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._gated(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), self._header])
            await send(message)

        await self.app(scope, receive, tagged)

    def _gated(self, send):
        async def gated(message):
            if message["type"] == "lifespan.startup.complete":
                problem = await self.wait_loaded()
                if problem is not None:
                    message = {"type": "lifespan.startup.failed",
                               "message": f"thawed replica {self.replica_id}: {problem}"}
                else:
                    log.info("replica %s: model loaded, taking traffic", self.replica_id)
            await send(message)

        return gated

    async def wait_loaded(self) -> str | None:
        """Wait while the model loads; the problem that keeps the replica from serving, or ``None``."""
        while self.state.status == "loading":
            await asyncio.sleep(self._poll)
        return replica_problem(self.state)
