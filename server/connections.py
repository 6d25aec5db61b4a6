"""Connection limits for ``thawed serve``: bind before loading, header timeout, uvicorn settings.

uvicorn closes idle keep-alive connections (``--timeout-keep-alive``), caps open connections +
tasks (``--limit-concurrency``: 503 above it) and the size of a request's head
(``h11_max_incomplete_event_size``), but it has no timeout for a client that connects and then
sends its headers a byte at a time (slowloris). ``GuardedH11Protocol`` adds one: the request
line and headers must arrive within ``--timeout-header`` seconds of the connection (or of the
previous response), else the connection is closed. The body timeout (``--timeout-body``: the
longest pause while a request body is read, answered 408) is ASGI middleware in ``app.py``.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from thawed.codecs.errors import ThawedError

__all__ = ["GuardedH11Protocol", "bind_socket", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 64 * 1024  # request line + headers (h11's default is 16 KiB; uvicorn's too)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head (``timeout_header`` seconds)."""

    timeout_header: float = 10.0  # set on a subclass by ``protocol_class``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.timeout_header, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._arm_header_timer()  # bytes of a new request: its head must be complete in time
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._waiting_for_head():  # a pipelined request already started
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.logger.info("closed a connection that sent no complete request head within %.0f s",
                             self.timeout_header)
            self.transport.close()


def protocol_class(timeout_header: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"timeout_header": float(timeout_header)})


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (and listen) before anything slow happens: a busy port is an error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses it
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then (without it
    # every keep-alive response waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ThawedError(f"port {port} on {host} is already in use (another server?); stop it or pass "
                              "another --port (THAWED_PORT); --port 0 picks a free one") from None
        raise ThawedError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
