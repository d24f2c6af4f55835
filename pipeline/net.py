"""Local networking helpers shared by every layer (standard library only, so light callers stay light)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the rendezvous port of a single-process job, a test's
    server, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
