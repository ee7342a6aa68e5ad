"""A fake node agent for the plugin's tests (the Python plugin's and the compiled fast path's)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class FakeAgent:
    """A unix socket answering each message with ``answer(message)`` after ``delay`` seconds:
    bytes are sent as they are (the fast path's framing), anything else as a JSON line, None
    closes without answering; every message kept."""

    def __init__(self, path: Path, answer: Callable[[dict[str, Any]], Any], delay: float = 0.0) -> None:
        self.path, self.answer, self.delay = path, answer, delay
        self.messages: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stopped = False

    def start(self) -> FakeAgent:
        self.sock.bind(str(self.path))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                message = json.loads(data)
                self.messages.append(message)
                time.sleep(self.delay)
                reply = self.answer(message)
                if reply is not None:
                    with contextlib.suppress(OSError):  # the plugin gave up waiting
                        conn.sendall(reply if isinstance(reply, bytes)
                                     else json.dumps(reply).encode() + b"\n")

    def stop(self) -> None:
        self.stopped = True
        self.thread.join(2)
        self.sock.close()
