"""A TCP proxy in front of the test server that can go silent: while frozen it keeps every
connection open and accepts new ones, but forwards nothing, as a network partition looks to a
client (no reset, no close, just no reply). It can also hold every reply for `reply_delay`
seconds (the server has run the command, the client hears of it late), or answer whatever the
client sends with `inject_reply` itself, without forwarding it (an error reply nobody expects)."""

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
