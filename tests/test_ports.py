"""Unit tests for ``dynllm.ports``: the backend port pool and its bind check.

Each test works in a small window of consecutive ports that were free on
127.0.0.1 a moment before (found by binding port 0 for a base and checking
the window), so ports held by other processes on the machine do not matter.
The quarantine clock is replaced with a fake one: no sleeps.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from dynllm import ports as ports_module
from dynllm.errors import DynllmError, Unavailable
from dynllm.ports import PortPool, listening_inodes, port_is_free

HOST = "127.0.0.1"


def _bindable(port: int) -> bool:
    """Independent of ``port_is_free``: can a fresh socket bind ``port`` now?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_window(size: int, attempts: int = 100) -> range:
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            base = sock.getsockname()[1]
        if base + size - 1 > 65535:
            continue
        window = range(base, base + size)
        if all(_bindable(port) for port in window):
            return window
    pytest.skip(f"found no {size} consecutive free ports on {HOST}")


@pytest.fixture
def window() -> Callable[[int], range]:
    """``window(n)``: n consecutive ports free on 127.0.0.1 right now."""
    return _free_window


@pytest.fixture
def occupy() -> Iterator[Callable[[int], socket.socket]]:
    """``occupy(port)``: bind ``port`` on 127.0.0.1 for the rest of the test."""
    held: list[socket.socket] = []

    def _occupy(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, port))
        except OSError:
            sock.close()
            pytest.skip(f"port {port} was taken by another process meanwhile")
        held.append(sock)
        return sock

    yield _occupy
    for sock in held:
        sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # Replace the module's view of ``time`` only, not the global time module.
    monkeypatch.setattr(ports_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _pool(ports: range, **kwargs: float) -> PortPool:
    return PortPool(ports.start, ports.stop - 1, **kwargs)


# ---- port_is_free ----------------------------------------------------------------


def test_port_is_free_on_a_free_port(window: Callable[[int], range]) -> None:
    (port,) = window(1)
    assert port_is_free(port)


def test_port_is_free_does_not_hold_the_port(window: Callable[[int], range]) -> None:
    (port,) = window(1)
    assert port_is_free(port)
    assert port_is_free(port)
    assert _bindable(port)


def test_port_is_not_free_when_bound(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    (port,) = window(1)
    occupy(port)
    assert not port_is_free(port)


def test_port_is_not_free_when_listening(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    (port,) = window(1)
    occupy(port).listen()
    assert not port_is_free(port)


# ---- construction ----------------------------------------------------------------


def test_inverted_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="inverted"):
        PortPool(9200, 9100)


def test_new_pool_has_nothing_leased(window: Callable[[int], range]) -> None:
    assert _pool(window(3)).leased == frozenset()


# ---- lease -----------------------------------------------------------------------


def test_lease_returns_distinct_ports_in_range(window: Callable[[int], range]) -> None:
    ports = window(5)
    pool = _pool(ports)
    leased = [pool.lease() for _ in range(5)]
    assert len(set(leased)) == 5
    assert set(leased) == set(ports)
    assert pool.leased == frozenset(ports)


def test_lease_walks_the_range_in_order(window: Callable[[int], range]) -> None:
    ports = window(4)
    pool = _pool(ports)
    assert [pool.lease() for _ in range(4)] == list(ports)


def test_single_port_range(window: Callable[[int], range]) -> None:
    (port,) = window(1)
    pool = PortPool(port, port)
    assert pool.lease() == port
    with pytest.raises(Unavailable):
        pool.lease()


def test_lease_does_not_hold_the_port_bound(window: Callable[[int], range]) -> None:
    """The backend, not the pool, binds the leased port."""
    ports = window(1)
    port = _pool(ports).lease()
    assert _bindable(port)


def test_leased_is_a_snapshot(window: Callable[[int], range]) -> None:
    pool = _pool(window(2))
    snapshot = pool.leased
    port = pool.lease()
    assert snapshot == frozenset()
    assert pool.leased == frozenset({port})


def test_lease_skips_a_port_bound_by_someone_else(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    ports = window(3)
    occupy(ports[0])
    pool = _pool(ports)
    assert pool.lease() == ports[1]
    assert ports[0] not in pool.leased


def test_lease_skips_several_bound_ports(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    ports = window(4)
    occupy(ports[0])
    occupy(ports[2])
    pool = _pool(ports)
    assert {pool.lease(), pool.lease()} == {ports[1], ports[3]}
    with pytest.raises(Unavailable):
        pool.lease()


def test_a_port_freed_by_its_other_owner_becomes_leasable(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    ports = window(2)
    holder = occupy(ports[1])
    pool = _pool(ports)
    assert pool.lease() == ports[0]
    with pytest.raises(Unavailable):
        pool.lease()
    holder.close()
    assert pool.lease() == ports[1]


# ---- exhaustion ------------------------------------------------------------------


def test_exhausting_the_range_raises_unavailable(window: Callable[[int], range]) -> None:
    ports = window(3)
    pool = _pool(ports)
    for _ in range(3):
        pool.lease()
    with pytest.raises(Unavailable) as info:
        pool.lease()
    err = info.value
    assert isinstance(err, DynllmError)
    assert err.status == 503
    assert f"{ports.start}-{ports.stop - 1}" in err.message
    assert "port_range_start" in err.message and "port_range_end" in err.message
    assert pool.leased == frozenset(ports)  # a failed lease leases nothing


def test_range_fully_bound_by_others_raises_unavailable(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    ports = window(2)
    for port in ports:
        occupy(port)
    pool = _pool(ports)
    with pytest.raises(Unavailable, match=f"{ports.start}-{ports.stop - 1}"):
        pool.lease()
    assert pool.leased == frozenset()


# ---- release ---------------------------------------------------------------------


def test_release_makes_a_port_leasable_again(window: Callable[[int], range]) -> None:
    ports = window(2)
    pool = _pool(ports)
    first, second = pool.lease(), pool.lease()
    pool.release(first)
    assert pool.leased == frozenset({second})
    assert pool.lease() == first
    assert pool.leased == frozenset(ports)


def test_release_of_an_unleased_port_is_harmless(window: Callable[[int], range]) -> None:
    ports = window(2)
    pool = _pool(ports)
    port = pool.lease()
    pool.release(port)
    pool.release(port)  # twice
    pool.release(1)  # never in range
    assert pool.leased == frozenset()
    assert {pool.lease(), pool.lease()} == set(ports)


# ---- rotation --------------------------------------------------------------------


def test_just_released_port_is_not_reused_while_others_are_free(
    window: Callable[[int], range],
) -> None:
    ports = window(3)
    pool = _pool(ports)
    port = pool.lease()
    assert port == ports[0]
    pool.release(port)
    assert pool.lease() == ports[1]


def test_rotation_cycles_through_the_whole_range(window: Callable[[int], range]) -> None:
    ports = window(3)
    pool = _pool(ports)
    seen = []
    for _ in range(7):
        port = pool.lease()
        seen.append(port)
        pool.release(port)
    assert seen == [ports[0], ports[1], ports[2], ports[0], ports[1], ports[2], ports[0]]


def test_rotation_wraps_around_to_the_start(window: Callable[[int], range]) -> None:
    ports = window(3)
    pool = _pool(ports)
    a, _b, _c = pool.lease(), pool.lease(), pool.lease()
    pool.release(a)
    assert pool.lease() == a


def test_just_released_port_is_reused_when_it_is_the_only_free_one(
    window: Callable[[int], range],
) -> None:
    ports = window(2)
    pool = _pool(ports)
    pool.lease()
    second = pool.lease()
    pool.release(second)
    assert pool.lease() == second


def test_rotation_continues_after_a_skipped_bound_port(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    ports = window(4)
    occupy(ports[1])
    pool = _pool(ports)
    first = pool.lease()
    pool.release(first)
    second = pool.lease()
    pool.release(second)
    third = pool.lease()
    assert [first, second, third] == [ports[0], ports[2], ports[3]]


# ---- quarantine ------------------------------------------------------------------


def test_quarantine_releases_the_port(window: Callable[[int], range], clock: FakeClock) -> None:
    pool = _pool(window(2))
    port = pool.lease()
    pool.quarantine(port)
    assert port not in pool.leased


def test_quarantined_port_is_skipped(window: Callable[[int], range], clock: FakeClock) -> None:
    ports = window(2)
    pool = _pool(ports, quarantine_seconds=30.0)
    port = pool.lease()
    assert port == ports[0]
    pool.quarantine(port)
    assert pool.lease() == ports[1]
    # Only the quarantined port is left: not leased even though it binds.
    assert _bindable(ports[0])
    with pytest.raises(Unavailable):
        pool.lease()


def test_quarantine_is_skipped_even_after_wrapping(
    window: Callable[[int], range], clock: FakeClock
) -> None:
    ports = window(3)
    pool = _pool(ports, quarantine_seconds=30.0)
    leased = [pool.lease() for _ in range(3)]
    pool.quarantine(leased[0])
    pool.release(leased[1])
    # The rotation would reach ports[0] first; it is quarantined.
    assert pool.lease() == ports[1]


def test_quarantine_expires(window: Callable[[int], range], clock: FakeClock) -> None:
    ports = window(1)
    pool = _pool(ports, quarantine_seconds=30.0)
    port = pool.lease()
    pool.quarantine(port)
    clock.now += 29.9
    with pytest.raises(Unavailable):
        pool.lease()
    clock.now += 0.2  # 30.1 s after the quarantine
    assert pool.lease() == port


def test_quarantine_lasts_exactly_until_its_deadline(
    window: Callable[[int], range], clock: FakeClock
) -> None:
    ports = window(1)
    pool = _pool(ports, quarantine_seconds=10.0)
    pool.quarantine(pool.lease())
    clock.now += 10.0
    assert pool.lease() == ports[0]


def test_quarantine_of_an_unleased_port_skips_it(
    window: Callable[[int], range], clock: FakeClock
) -> None:
    ports = window(2)
    pool = _pool(ports)
    pool.quarantine(ports[0])
    assert pool.lease() == ports[1]
    with pytest.raises(Unavailable):
        pool.lease()


def test_quarantine_again_extends_the_deadline(
    window: Callable[[int], range], clock: FakeClock
) -> None:
    ports = window(1)
    pool = _pool(ports, quarantine_seconds=30.0)
    port = ports[0]
    pool.quarantine(port)
    clock.now += 20.0
    pool.quarantine(port)
    clock.now += 20.0  # 40 s after the first, 20 s after the second
    with pytest.raises(Unavailable):
        pool.lease()
    clock.now += 10.0
    assert pool.lease() == port


def test_zero_quarantine_seconds_does_not_block(
    window: Callable[[int], range], clock: FakeClock
) -> None:
    ports = window(1)
    pool = _pool(ports, quarantine_seconds=0.0)
    pool.quarantine(pool.lease())
    assert pool.lease() == ports[0]


def test_default_quarantine_is_30_seconds(window: Callable[[int], range], clock: FakeClock) -> None:
    ports = window(1)
    pool = _pool(ports)
    pool.quarantine(pool.lease())
    clock.now += 29.0
    with pytest.raises(Unavailable):
        pool.lease()
    clock.now += 1.0
    assert pool.lease() == ports[0]


def test_a_port_with_connections_in_time_wait_is_free() -> None:
    """An earlier backend's closed connections linger in TIME_WAIT on its port;
    a new backend (SO_REUSEADDR) can bind it, so the pool must see it as free."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    listener.close()
    assert not _bindable(port)  # a plain bind is refused ...
    assert port_is_free(port)  # ... but a server's bind is not


# ---- listening_inodes: who listens on a port ------------------------------------------


def _inode(sock: socket.socket) -> int:
    """The socket's inode as its fd link shows it (``socket:[N]``)."""
    link = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    assert link.startswith("socket:["), link
    return int(link[8:-1])


def test_listening_inodes_sees_only_listeners_on_that_port(
    window: Callable[[int], range], occupy: Callable[[int], socket.socket]
) -> None:
    first, second = window(2)
    listener = occupy(first)
    assert listening_inodes(first) == set()  # bound, not listening: receives nothing
    listener.listen()
    other = occupy(second)
    other.listen()
    assert listening_inodes(first) == {_inode(listener)}
    assert listening_inodes(second) == {_inode(other)}
    # A connection to the listener is not a listener (ESTABLISHED on both ends).
    with socket.create_connection((HOST, first)) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert listening_inodes(first) == {_inode(listener)}
            assert _inode(client) not in (listening_inodes(client.getsockname()[1]) or set())


def test_listening_inodes_sees_ipv6_and_shared_listeners(window: Callable[[int], range]) -> None:
    """Every listener counts: one on another family, and a second one that
    shares the port through SO_REUSEPORT (it would get half the connections)."""
    (port,) = window(1)
    socks = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((HOST, port))
            sock.listen()
            socks.append(sock)
        try:
            six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            six.bind(("::1", port))
            six.listen()
            socks.append(six)
        except OSError:
            pass  # no IPv6 loopback here: the two IPv4 listeners still count
        found = listening_inodes(port)
        assert found == {_inode(s) for s in socks}
        assert len(found) >= 2
    finally:
        for sock in socks:
            sock.close()
    assert listening_inodes(port) == set()
