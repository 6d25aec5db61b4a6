"""An ASGI middleware for Serve's HTTP proxy: a request whose replica dies ends cleanly.

When a replica's process dies, Serve's proxy stops relaying its response without finishing it:
a stream would stop mid-way (the client sees a broken chunked body), an unanswered request would
get a bare 500. ``ReplicaLossGuard`` finishes both the way ``thawed serve`` reports errors:
- a started server-sent-event stream gets a last error event (the OpenAI form
  ``data: {"error": {...}}`` on ``/v1/...``, TGI's ``{"error", "error_type"}`` elsewhere) and a
  proper end, so SDKs raise an error instead of hanging or reading a truncated body;
- a request that had no answer yet gets 503 with ``Retry-After: 1`` (a retry goes to a survivor).

Serve loads proxy middlewares from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set in the
environment of every Ray node: ``thawed serve-cluster`` sets it for the cluster it starts; on an
existing cluster or KubeRay set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=thawed.server.cluster.proxy:middlewares``.
"""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware

__all__ = ["ReplicaLossGuard", "middlewares", "CALLBACK_ENV", "CALLBACK_PATH", "LOST_MESSAGE"]

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "thawed.server.cluster.proxy:middlewares"
LOST_MESSAGE = ("the replica serving this request stopped before it finished (Serve restarts it); "
                "retry the request: it goes to a replica that is up")


def middlewares() -> list[Middleware]:
    """The proxy callback Serve calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ReplicaLossGuard)]


def _error_event(path: str) -> bytes:
    if path.startswith("/v1/"):
        body = {"error": {"message": LOST_MESSAGE, "type": "unavailable_error", "param": None, "code": 503}}
    else:  # TGI's stream error: a string and its type
        body = {"error": LOST_MESSAGE, "error_type": "unavailable"}
    return f"data: {json.dumps(body)}\n\n".encode()


class ReplicaLossGuard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = sse = gone = False

        async def watched_receive():
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def watched_send(message):
            nonlocal started, finished, sse
            if message["type"] == "http.response.start":
                started = True
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        sse = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        await self.app(scope, watched_receive, watched_send)
        if finished or gone:
            return
        path = scope.get("path", "")
        try:
            if not started:
                log.warning("%s %s: no answer from its replica; answering 503", scope.get("method"), path)
                body = json.dumps({"error": {"message": LOST_MESSAGE, "type": "unavailable_error",
                                             "param": None, "code": 503}}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif sse:
                log.warning("%s %s: its replica stopped mid-stream; ending the stream with an error event",
                            scope.get("method"), path)
                await send({"type": "http.response.body", "body": _error_event(path)})
            # a plain body cut short is left cut short: finishing it would pass off a truncated answer
        except OSError:  # the client went away meanwhile
            return
