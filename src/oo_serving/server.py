"""Graceful shutdown: on SIGTERM, stop accepting, answer what was received, then close.

uvicorn's own drain resets clients in the middle of a request in three ways, each
measured under load by tests/e2e/test_shutdown.py:

1. It closes every keep-alive connection that is idle at that moment, even when the
   client's next request is already in the socket buffer or on its way. The client sees
   a reset, or the connection closed without an answer, after it sent its request.
2. With several workers, the parent process keeps its copy of the listening socket open
   until every worker has exited. The kernel goes on completing new connections into the
   listen backlog, where nobody accepts them any more, and resets them when the parent
   exits; their clients have sent their requests by then.
3. Connections that are in the backlog when the last copy of the listening socket closes
   are reset, for the same reason.

Here, the process that owns the listening socket (the parent when there are several
workers) first makes the kernel drop new connection attempts: a socket filter, so no
connection completes any more, and a client's connect is retried and then refused once
the socket is closed; it never sends a byte. Each server then lets its event loop accept
what was already queued before it closes its copy of the socket, and the parent closes
its own. Every connection is answered for what it sends, with `Connection: close`, and
closed; an idle one by the keep-alive timer. After `timeout_graceful_shutdown` uvicorn
cancels what is still running. Then the application's lifespan closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import select
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from types import FrameType

from uvicorn import Config, Server
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("uvicorn.error")

# How long a server waits for its event loop to accept the connections the kernel had
# queued before it stopped taking new ones; normally a few milliseconds.
ACCEPT_QUEUED_S = 2.0

# SO_ATTACH_FILTER from <asm-generic/socket.h>; Python's socket module does not export it.
_SO_ATTACH_FILTER = 26
# A classic BPF program of one instruction, `ret #0`: keep 0 bytes of every packet, that is
# drop it. On a listening socket it drops SYNs, so no connection completes any more; the
# connections already in the backlog are not affected.
_DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)


def run(config: Config) -> None:
    """Serve `config` as `uvicorn.run` would, with the graceful shutdown above. Exits
    with STARTUP_FAILURE (3) if the server does not start: the address cannot be bound,
    or a worker fails before it serves."""
    # Bound here, in every case, so that each server holds its listening socket as a
    # socket object it can filter before closing.
    try:
        sock = config.bind_socket()
    except SystemExit:
        # uvicorn has logged the OS's reason (e.g. address already in use); say where.
        logger.error("Cannot listen on %s:%d", config.host, config.port)
        raise
    if config.workers > 1:
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
        if supervisor.startup_failed:
            sys.exit(STARTUP_FAILURE)
        return
    server = DrainingServer(config, owns_listener=True)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


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


class DrainingServer(Server):
    """uvicorn's server that accepts what the kernel queued before it closes its
    listening socket, and exits 0 after a graceful stop.

    `owns_listener`: no other process holds the socket, so this server also stops new
    connections. A worker leaves that to its parent: a worker may be stopping alone (a
    restart, fewer workers) while the others go on serving on the same socket.
    """

    def __init__(self, config: Config, *, owns_listener: bool) -> None:
        super().__init__(config)
        self._owns_listener = owns_listener

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = sockets or []
        if self._owns_listener:
            for sock in listeners:
                _drop_new_connections(sock)
        await _accept_queued(listeners)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn raises the signal again once it has stopped, so the process dies
            # of SIGTERM; the stop was orderly, so end normally, with exit code 0.
            self._captured_signals.clear()


async def _accept_queued(listeners: list[socket.socket]) -> None:
    """Return once the kernel holds no connection for these listening sockets: this event
    loop (or another worker's) accepts them meanwhile. Once new connections are dropped,
    the queue stays empty, so closing the sockets resets nobody."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ACCEPT_QUEUED_S
    while _has_queued_connections(listeners):
        if loop.time() >= deadline:
            logger.warning("Connections still queued at shutdown may be reset")
            break
        await asyncio.sleep(0.005)
    # The loop calls connection_made soon after each accept; let those calls run, so
    # that uvicorn tells these connections too that the server is stopping.
    await asyncio.sleep(0)


def _drop_new_connections(sock: socket.socket) -> None:
    if sys.platform != "linux" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # elsewhere, uvicorn's behaviour: queued connections may be reset
    program = ctypes.create_string_buffer(_DROP_EVERY_PACKET, len(_DROP_EVERY_PACKET))
    sock_fprog = struct.pack("HP", 1, ctypes.addressof(program))  # the kernel copies it
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, sock_fprog)
    except OSError as exc:
        logger.warning("Could not stop new connections before closing: %s", exc)


def _has_queued_connections(listeners: list[socket.socket]) -> bool:
    """A listening socket is readable while its accept queue is not empty."""
    poller = select.poll()
    for sock in listeners:
        if sock.fileno() >= 0:
            poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Worker(Process):
    """A worker process that serves with DrainingServer."""

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = DrainingServer(self.config, owns_listener=False)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's parent of several workers, whose workers are DrainingServers, and which
    stops new connections the moment it is told to stop, then closes its copy of the
    listening socket before it forwards the signal to the workers."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        # A worker exited before serving, and the supervisor stopped: the exit code says so.
        self.startup_failed = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        # At once, not at the next turn of the supervisor's loop (up to 0.5 s): when the
        # signal went to the whole process group, the workers are stopping already, and
        # connections queued behind their backs would be reset.
        for sock in self.sockets:
            if sock.fileno() >= 0:
                _drop_new_connections(sock)
        self.signal_queue.append(sig)

    def handle_term(self) -> None:
        self._close_listeners()
        super().handle_term()

    def handle_int(self) -> None:
        self._close_listeners()
        super().handle_int()

    def _close_listeners(self) -> None:
        # The parent never accepts: while it holds the socket, the workers' copies closing
        # would not close it, and what the kernel queued after would be reset at its exit.
        for sock in self.sockets:
            sock.close()

    # uvicorn's own methods, which make every worker with _Worker instead of Process.
    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._start_worker())

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving: every restart would fail the same way.
                logger.error("Child process [%s] failed to start, stopping.", process.pid)
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info("Child process [%s] died", process.pid)
            self.processes[idx] = self._start_worker()

    def restart_all(self) -> None:
        for idx, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self._start_worker()
            if not new_process.wait_until_ready(
                self.config.timeout_worker_healthcheck, self.should_exit
            ):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    logger.error(
                        "New child process [%s] was not ready in time;"
                        " keeping worker [%s] and aborting the restart.",
                        new_process.pid,
                        old_process.pid,
                    )
                return
            old_process.terminate()
            old_process.join()
            self.processes[idx] = new_process

    def handle_ttin(self) -> None:
        if self.should_exit.is_set():
            return  # stopping: the listening socket is closed
        logger.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        self.processes.append(self._start_worker())

    def _start_worker(self) -> Process:
        process = _Worker(self.config, self.sockets)
        process.start()
        return process
