"""uvicorn as `bytelm serve` runs it: HTTP/1.1 on h11, with a deadline for every request's headers.

    config = server_config(app, host="127.0.0.1", port=8000)      # a uvicorn.Config
    uvicorn.Server(config).run()

uvicorn closes a kept-alive connection after `idle_timeout` seconds without a new request, but starts no clock
on a fresh connection, and restarts none when a byte arrives: a client that opens connections and never
finishes its headers would hold each open for ever (3,000 of them stayed open past 30 s). Here a connection
gets `header_timeout` seconds, from its start and again after each answer, to send a request's headers.
"""
from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # as Go's ReadHeaderTimeout is often set; a browser sends its headers at once
IDLE_TIMEOUT_S = 5  # uvicorn's keep-alive default


class _HeaderDeadlineH11(H11Protocol):
    """h11 with a deadline on the request line and headers (the class attribute header_timeout, in seconds)."""

    header_timeout = HEADER_TIMEOUT_S

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # nothing was asked, so there is nobody to answer

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the request is being served
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # a kept-alive connection must send its next headers in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT_S,
                  idle_timeout: float = IDLE_TIMEOUT_S, **kwargs) -> uvicorn.Config:
    """uvicorn's Config for `app` with the header deadline and idle timeout; kwargs go to uvicorn.Config."""
    protocol = type("HeaderDeadlineH11", (_HeaderDeadlineH11,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=idle_timeout, **kwargs)
