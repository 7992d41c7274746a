import socket

from controlplane import ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    floor = ports._ephemeral_floor()
    assert all(20000 <= p < max(floor, 21000) for p in picked)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked[-1]))


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        assert not ports._bindable(busy.getsockname()[1])


def test_reserved_ports_are_not_handed_out() -> None:
    before = set(ports._handed_out)
    ports.reserve(*range(ports._FLOOR, ports._CEILING))
    try:
        try:
            ports.free_port()
        except RuntimeError as exc:
            assert "no free port" in str(exc)
        else:
            raise AssertionError("a reserved port was handed out")
    finally:
        ports._handed_out.clear()
        ports._handed_out.update(before)
