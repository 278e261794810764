"""A source's control socket: a ZeroMQ ROUTER owned by one thread, which hands each
incoming message to the server and sends the replies any thread queued."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

import zmq

from loader.transfer import protocol

log = logging.getLogger(__name__)

_TICK_S = 0.25
_POLL_MS = int(_TICK_S * 1000)


class ControlChannel:
    """`on_message(frames)` runs on the channel's thread for every message;
    `reply()` may be called from any thread. With `keys` (mesh.security.ClusterKeys)
    the socket requires CURVE auth. `on_tick()` runs on the channel's thread at least
    every _TICK_S."""

    def __init__(
        self,
        on_message: Callable[[list[zmq.Frame]], None],
        max_message_bytes: int,
        keys,
        label: str,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_message = on_message
        self._on_tick = on_tick
        self._max_message_bytes = max_message_bytes
        self._keys = keys
        self._label = label
        self._outbox: queue.Queue[list] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def bind(self, host: str, port: int) -> int:
        """Bind (`port=0`: a free port) and return the port. On failure nothing stays open:
        a context left to the garbage collector can block its collection for good."""
        from mesh.security import secure_server

        self._context = zmq.Context()
        try:
            router = self._context.socket(zmq.ROUTER)
            self._router = router
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            if ":" in host:
                router.setsockopt(zmq.IPV6, 1)
            secure_server(router, self._keys)
            bind_host = f"[{host}]" if ":" in host else host
            if port:
                router.bind(f"tcp://{bind_host}:{port}")
                return port
            return router.bind_to_random_port(f"tcp://{bind_host}")
        except BaseException:
            self.close(0)
            raise

    def start(self, thread_name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def reply(self, identity: bytes, msg: dict, data: bytes | None = None) -> None:
        """Queue a reply (with `data`, a binary frame after the message); only the
        channel's thread touches the ROUTER socket."""
        frames = [identity, protocol.encode(msg)]
        if data is not None:
            frames.append(data)
        self._outbox.put(frames)
        if threading.current_thread() is not self._thread:
            self._wake()

    def stop(self) -> None:
        """Ask the channel's thread to end (close() waits for it)."""
        self._stopping.set()
        self._wake()

    def close(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._context is not None:
            from mesh.security import close_context

            close_context(self._context)
            self._context = None
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        # pyzmq reports a plain socket by its file descriptor, not the object registered
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        next_tick = time.monotonic() + _TICK_S
        while not self._stopping.is_set():
            try:
                events = dict(poller.poll(_POLL_MS))
                if wake_fd in events:
                    self._drain_wakeups()
                self._flush_outbox()
                if self._router in events:
                    self._handle_incoming()
                    self._flush_outbox()  # refusals are answered from this thread
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK_S
                    self._on_tick()
            except Exception:
                if self._stopping.is_set():
                    break
                log.exception("%s: control loop error (continuing)", self._label)
                time.sleep(0.1)

    def _handle_incoming(self) -> None:
        for _ in range(100):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames)

    def _flush_outbox(self) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("%s: reply dropped: %s", self._label, exc)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # buffer full (a wakeup is already pending) or closed

    def _drain_wakeups(self) -> None:
        self._wake_r.setblocking(False)
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
