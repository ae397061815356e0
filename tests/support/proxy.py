"""TCP proxies in front of the test server. SilentProxy can go silent: while frozen it keeps every
connection open and accepts new ones, but forwards nothing, as a network partition looks to a
client (no reset, no close, just no reply). It can also hold every reply for `reply_delay`
seconds (the server has run the command, the client hears of it late), or answer whatever the
client sends with `inject_reply` itself, without forwarding it (an error reply nobody expects).
FaultProxy cuts every connection, delays replies, or sends new connections to another server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SilentProxy:
    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._frozen = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self.reply_delay = 0.0
        self.inject_reply: bytes | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, replies), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if not replies and self.inject_reply is not None:
                    source.sendall(self.inject_reply)
                    continue
                if replies and self.reply_delay:
                    time.sleep(self.reply_delay)
                if not self._frozen.is_set():  # else lost, as in a partition
                    sink.sendall(data)
        except OSError:
            return
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FaultProxy:
    """A TCP proxy in front of the test server that can cut every connection (as a load balancer
    or a NAT table that forgets them: the client sees a reset), delay every reply (a congested
    link: slower than STREAMGROUP_REDIS_TIMEOUT_MS makes the client time out while the server has
    done the work), and be pointed at another server (a failover). New connections to a server
    that is down are closed at once, as a refused connection would be."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.delay_seconds = 0.0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> int:
        """Drop every open connection; returns how many were open. New ones are accepted."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                # shutdown first: it wakes the pump blocked in recv (a bare close would not, and the
                # descriptor would stay open under it)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        return len(pairs)

    def delay(self, seconds: float) -> None:
        """Hold every reply (server to client) this long before passing it on; 0 to stop."""
        self.delay_seconds = seconds

    def retarget(self, port: int) -> None:
        """Send new connections to another server; existing ones stay where they are (cut them)."""
        self.target_port = port

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees its connection closed
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.delay_seconds:
                    time.sleep(self.delay_seconds)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._pairs = [pair for pair in self._pairs if source not in pair]
