"""A small TCP proxy on loopback that a test can cut or stall, in place of a network fault
(this machine has no ``tc netem``).

``cut()`` closes every proxied connection and refuses new ones (a network partition that
resets, or a server gone); ``stall()`` keeps connections open but forwards nothing in either
direction (a partition that drops packets silently, a frozen peer); ``restore()`` heals both.
"""

from __future__ import annotations

import select
import socket
import threading

PASS, STALL, CUT = "pass", "stall", "cut"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.mode = PASS
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_forever, name="tcp-proxy", daemon=True)
        self._thread.start()

    def url(self, password: str | None = None, db: int = 0) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    # -- faults --------------------------------------------------------------------------------
    def cut(self) -> None:
        """Reset every connection and refuse new ones until ``restore()``."""
        with self._lock:
            self.mode = CUT
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _close(a)
            _close(b)

    def stall(self) -> None:
        """Forward nothing, in either direction, until ``restore()``; connections stay open."""
        self.mode = STALL

    def restore(self) -> None:
        self.mode = PASS

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        self._thread.join(5)

    # -- plumbing ------------------------------------------------------------------------------
    def _accept_forever(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == CUT:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._closed.is_set() and self.mode != CUT:
                if self.mode == STALL:
                    self._closed.wait(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return
        finally:
            _close(a)
            _close(b)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
