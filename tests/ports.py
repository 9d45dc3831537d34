"""A free TCP port for a torchrun or accelerate rendezvous: fixed ports collide when two suites run on one machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
