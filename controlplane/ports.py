"""Pick free TCP ports on 127.0.0.1 for child processes (the demo, tests and benchmarks).

A port is picked below the kernel's ephemeral range: one taken from that range (bind to port 0, then close)
can be given to an outgoing connection's source address before the child binds it, and the child then exits
with "address already in use". One process never hands the same port out twice, nor one it was told is taken
(``reserve``: ports given on the command line for a child that binds them later).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_FLOOR = 20000


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_CEILING = max(_FLOOR + 1000, _ephemeral_floor())
_handed_out: set[int] = set()
_rng = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def reserve(*ports: int) -> None:
    """Never hand these out (they are meant for a process that has not bound them yet)."""
    _handed_out.update(ports)


def free_port() -> int:
    for _ in range(1000):
        port = _rng.randrange(_FLOOR, _CEILING)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 between {_FLOOR} and {_CEILING}")
