"""The WebSocket protocol `camface serve` gives uvicorn: uvicorn 0.54's websockets-sansio one, with
a shutdown that does not fail on a connection whose closing handshake has begun.

When a client closes, websockets answers the close frame itself and uvicorn closes the transport;
the connection stays in uvicorn's list until the transport reports it lost (over TLS, after the
TLS shutdown). Ctrl-C or SIGTERM in that window made uvicorn send a second close frame, and
websockets raised InvalidState ("connection is closing"): a traceback, and exit status 1 instead
of 130/143. Such a connection needs only its transport closed.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State


class ServeWebSocketProtocol(WebSocketsSansIOProtocol):
    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent and self.conn.state is not State.OPEN:
            self.close_sent = True  # the close frame went out already: uvicorn only closes the transport
        super().shutdown()
