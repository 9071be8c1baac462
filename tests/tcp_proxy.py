"""A loopback TCP proxy whose open connections can be made to go silent: what a client sees of a server host that
drops its packets (a partition, a failover to another host, a host powered off), while new connections go
through, to the same server, as to a host that came back or to the one that took over. No connection is closed
or reset: the client hears nothing at all, as it would over a real network."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SilencingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def silence(self) -> int:
        """The connections open now relay nothing more, either way, and stay open; answers how many (those
        silenced before included)."""
        with self._lock:
            for _, _, silenced in self._pairs:
                silenced.set()
            return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for client, server, _ in self._pairs:
                client.close()
                server.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            silenced = threading.Event()
            with self._lock:
                self._pairs.append((client, server, silenced))
                self.connections += 1
            threading.Thread(target=self._relay, args=(client, server, silenced), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket, silenced: threading.Event) -> None:
        peer = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(server, selectors.EVENT_READ)
            while not self._closed.is_set() and not silenced.is_set():
                for key, _ in selector.select(timeout=0.1):
                    if silenced.is_set():
                        break
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if data:
                            peer[key.fileobj].sendall(data)  # type: ignore[index]
                            continue
                    except OSError:
                        pass
                    client.close()  # one side closed or failed: so is the other, as a real connection's end
                    server.close()
                    with self._lock:
                        self._pairs.remove((client, server, silenced))
                    return


@contextmanager
def silencing_proxy(target_port: int) -> Iterator[SilencingProxy]:
    proxy = SilencingProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()
