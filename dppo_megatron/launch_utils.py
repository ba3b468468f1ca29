"""Small helpers for starting multi-process jobs on one machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
