"""Small process-local helpers shared by the launchers, the embedded services and the tests: free loopback ports and
environment changes that are undone afterwards."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterable, Iterator, Mapping


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@contextlib.contextmanager
def environ(updates: Mapping[str, str], remove: Iterable[str] = ()) -> Iterator[None]:
    """os.environ with `updates` set and `remove` unset for the block; every touched variable is restored after
    (set back, or unset when it was not set)."""
    touched = set(updates) | set(remove)
    saved = {k: os.environ.get(k) for k in touched}
    for k in remove:
        os.environ.pop(k, None)
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
