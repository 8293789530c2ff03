"""serving.client.free_port: ports for local services, outside the ranges Ray and the kernel
hand out on their own (a port from bind(0) could be taken again before the service binds it)."""

import socket

from serving.client import free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= p < low for p in ports)  # above Ray's worker ports, below ephemeral
    for p in ports[:5]:
        for host in ("127.0.0.1", ""):
            with socket.socket() as s:
                s.bind((host, p))


def test_a_taken_port_is_skipped(monkeypatch):
    import serving.client as client

    held = socket.socket()
    held.bind(("", 0))  # any port; the draw is scripted to try it first
    held.listen()
    taken = held.getsockname()[1]
    spare = free_port()
    client._GIVEN.discard(spare)

    class Script:
        def __init__(self, seed):
            self.ports = [taken, spare]

        def randrange(self, lo, hi):
            return self.ports.pop(0)

    monkeypatch.setattr(client.random, "Random", Script)
    try:
        assert client.free_port() == spare
    finally:
        held.close()
