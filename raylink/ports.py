"""Free TCP ports for servers next to Ray's (cluster nodes, Serve's HTTP front, side ports).

No Ray import: the local cluster picks its nodes' ports before any Ray process runs.
"""
from __future__ import annotations

import random
import socket


def pick_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range (32768+).

    A port the kernel hands out for `bind(0)` is free now but may be taken seconds later by one
    of Ray's own servers, which bind ephemeral ports too; HAProxy binds only after the Serve
    controller has started it, so it would fail with "Address already in use".
    """
    for _ in range(200):
        port = random.randint(20000, 29999)  # Ray's replica ports are 30000-31000
        if port_free(port, host):
            return port
    raise RuntimeError("no free TCP port in 20000-29999")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
