"""The HTTP layer under the app: uvicorn with a header deadline, a keep-alive that outlives clients' idle
timeouts, and a bounded graceful shutdown.

What uvicorn 0.54 offers and what is added here:

- ``timeout_keep_alive`` (default 5 s) closes idle keep-alive connections; httpx also drops idle connections
  after 5 s, so a client could reuse a connection at the instant the server closes it (about 1 request in 3,000
  failed with a read error). It is set from ``server.keep_alive_s`` (75 s), longer than common clients' idle
  timeouts.
- ``timeout_graceful_shutdown`` bounds the wait for requests in flight after SIGTERM (default: forever). It is set
  from ``server.shutdown_grace_s``; ``RewardService.begin_shutdown`` fails still-waiting requests with 503 before
  it ends, and what is cut at the end is answered 503 in JSON by the endpoint.
- uvicorn has no deadline for reading a request's headers (a connection that sends half a header line, or
  nothing, is held forever; h11 only bounds their size, ``h11_max_incomplete_event_size``, 16 KiB). The protocol
  below closes such a connection after ``server.read_timeout_s`` (408 when part of a request arrived). The body's
  deadline is the endpoint's (``app._BodyReader``), which can answer in JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from typing import Any, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderDeadlineProtocol", "GracefulServer", "serve"]


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers.

    The clock starts when the connection opens and again at the first byte of each next request (idle time
    between requests is the keep-alive's business); it stops when the request line and headers are complete.
    Past ``read_timeout_s``: 408 (when part of a request came) and the connection is closed.
    """

    def __init__(self, *args: Any, read_timeout_s: float = 30.0, on_timeout: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.on_timeout = on_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.read_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        self._got_bytes = self._got_bytes or bool(data)
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
        elif self.conn.their_state is h11.IDLE:
            self._arm()  # part of a next request's head is in: its clock runs
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._got_bytes = False
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._got_bytes = True
            self._arm()  # a pipelined next request is partly in

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a reply is still being written (pipelining); the keep-alive takes over after it
        if self.on_timeout is not None:
            self.on_timeout()
        if self._got_bytes and self.conn.trailing_data[0]:
            self.transport.write(_timeout_reply(self.read_timeout_s))  # part of a request came: say why it goes
        self.transport.close()


@functools.lru_cache(maxsize=8)
def _timeout_reply(read_timeout_s: float) -> bytes:
    body = json.dumps({"error": f"the request headers did not arrive within {read_timeout_s:g} s "
                                f"(server.read_timeout_s)", "status": 408}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` that tells the app when shutdown begins (``on_shutdown()``), before uvicorn closes the
    listeners and waits up to ``timeout_graceful_shutdown`` for requests in flight."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets=sockets)


def serve(app: Any, service: Any, host: str, port: int, sock: socket.socket | None = None,
          log_level: str = "warning") -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT, with the server settings of ``service.config``.

    ``sock``: an already bound (not yet listening) socket, so the port was checked and held before the model
    loaded; uvicorn starts listening on it.
    """
    config = service.config
    protocol = functools.partial(HeaderDeadlineProtocol, read_timeout_s=config.read_timeout_s,
                                 on_timeout=service.metrics.read_timeouts.inc)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
                               timeout_keep_alive=config.keep_alive_s,
                               timeout_graceful_shutdown=config.shutdown_grace_s)
    server = GracefulServer(uv_config, lambda: service.begin_shutdown(config.shutdown_grace_s))
    server.run(sockets=[sock] if sock is not None else None)
