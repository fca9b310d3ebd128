"""Connection bounds for mra-serve's uvicorn: a deadline to receive each request (headers and
body), and a bound on open connections.

uvicorn has no header timeout: a client that opens a connection and never finishes its headers
is held until it goes away (1,000 of them were held until the open-file limit stopped the
server). :class:`BoundedH11Protocol` is uvicorn's h11 protocol with a timer per request: armed
when a connection opens and after each response (for the next request on a kept-alive
connection), disarmed once the request's body has been read; when it fires, the client gets
408 and the connection is closed. Past ``max_connections`` open connections, a new one gets 503
and is closed at once, before anything of it is read.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("mra.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout_s: float = 30.0  # from connect (or the last response) to the request's last body byte
    max_connections: int = 256  # open at once; keep it below the process's open-file limit
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s")


def _error(template: bytes, message: str, code: str) -> bytes:
    body = b'{"error": {"message": "%s", "type": "invalid_request_error", "param": null, "code": "%s"}}' % (
        message.encode(), code.encode())
    return template % (len(body), body)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds of :class:`ConnectionLimits` (set by :func:`protocol`)."""

    limits = ConnectionLimits()
    _deadline: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.limits.max_connections:
            self._refused = True
            transport.write(_error(_REFUSED, f"connections | {self.limits.max_connections} open, the bound of "
                                   "mra-serve --max-connections; retry shortly", "too_many_connections"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is read; its run is bounded by --timeout

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # for the next request on this connection (before a pipelined one is read)
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_error(_TIMED_OUT, f"request | not received within {self.limits.read_timeout_s:g} "
                                        "s, the bound of mra-serve --read-timeout; send the whole request at once",
                                        "request_timeout"))
        self.transport.close()


def protocol(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """The protocol class to pass as uvicorn's ``http=``."""
    if limits.read_timeout_s <= 0 or limits.max_connections < 1:
        raise ValueError(f"connection limits | got {limits}, expected a positive timeout and connection count")
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"limits": limits})
