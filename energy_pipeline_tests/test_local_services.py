"""The local servers' helpers that need no server."""

from __future__ import annotations

import socket

from energy_pipeline.devtools.services import LOOPBACK, _ephemeral_floor, free_port


def test_free_ports_are_bindable_and_below_the_kernels_ephemeral_range():
    # A port the kernel may give an outgoing connection could be taken before a server binds it.
    ports = {free_port() for _ in range(50)}
    assert all(20_000 <= p < _ephemeral_floor() for p in ports)
    assert len(ports) > 1  # picked at random, so parallel test workers rarely pick the same one
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, ports.pop()))
