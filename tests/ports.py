"""Ports for the servers the tests start on 127.0.0.1.

A port found free by binding port 0 comes from the kernel's ephemeral range, the range
every outgoing connection and every other port-0 bind (Ray starts dozens) also draws its
local port from: between the probe and the test's server binding it, one of those can
take it (seen in CI: Ray Serve's proxy, `Failed to bind to address '127.0.0.1:44217'`).
So `free_port` picks below that range, and above Ray's worker ports (10002-19999).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RAY_WORKER_PORTS_END = 19999
_PROBES = 200


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing on 127.0.0.1 holds now, outside the ranges the system hands out."""
    low, high = _RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    for _ in range(_PROBES):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{high} after {_PROBES} tries")
