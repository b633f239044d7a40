"""Graceful shutdown: on SIGTERM, stop accepting, answer what was received, then close.

uvicorn's own drain closes every keep-alive connection that is idle at that moment,
even when the client's next request is already in the socket buffer or on its way. The
client sees a reset, or the connection closed without an answer, after it sent its
request, and cannot know whether it was applied.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that, once the server stops, answers every request
    that reaches it with `Connection: close` instead of dropping an idle connection.

    The hot path pays one attribute check per request.
    """

    _draining = False

    def shutdown(self) -> None:
        """Called once by the server when it starts to stop."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # in flight: close once its answer is sent
            return
        # Idle. The client may already have sent its next request, or be sending it:
        # keep reading, answer it and close. A client that sends nothing is closed by the
        # keep-alive timer, as it would have been anyway; a connection that has not yet
        # finished its first request has no timer, so it gets one now.
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining:
            self.cycle.keep_alive = False  # the answer says `Connection: close`
