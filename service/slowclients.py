"""A read timeout for clients that stall mid-request (slow-loris), which uvicorn does not have.

uvicorn closes idle keep-alive connections, but a connection that sends half a request line, or a
body one byte a minute, holds its socket and a slot forever. This protocol (uvicorn's h11 one) arms a
timer on every chunk received; if it fires while the client still owes us headers or body bytes,
and the server is not the one holding reads back, the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("onnxzip.service")


def protocol_with_read_timeout(read_timeout_s: float) -> type:
    """uvicorn's `http=` protocol class with this read timeout."""

    class ReadTimeoutProtocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout_s, self._expired)

        def _expired(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return  # the request is complete: the app is at work or answering; no client bytes are owed
            if self.flow.read_paused:  # we hold reads back (the app has not taken the body yet): not the client
                return self._arm()
            log.info("closed a connection from %s: no bytes for %g s in the middle of a request",
                     self.client[0] if self.client else "?", read_timeout_s)
            self.transport.close()

    return ReadTimeoutProtocol
