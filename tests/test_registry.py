"""The transport registry: every transport provides the public API, a first message is routed by its
bytes, and a third transport needs nothing but its module and one registry line."""
import time

import msgpack
import pytest
import torch
import zmq

import toy_transport
from shmrt.errors import ProtocolError, SetupError
from shmrt.wire import msgpack_transport, protocol, registry, shm_transport
from shmrt.wire.peer import client_info


def test_every_registered_transport_provides_the_public_api():
    for name in registry.TRANSPORTS:
        module = registry.select(name)
        assert all(hasattr(module, attr) for attr in registry.PUBLIC_API), name
        assert module.NAME == name and module.Client.name == name and module.Session.transport == name


def test_unknown_transport_name_lists_the_known_ones():
    with pytest.raises(SetupError, match=r"unknown transport 'udp'; expected one of \('shm', 'msgpack'\)"):
        registry.client_transport("udp", "ipc:///tmp/x.sock", timeout=1)


def test_first_message_is_routed_by_its_bytes():
    token = b"t" * 16
    hello = protocol.encode(protocol.Doorbell(protocol.Method.Hello, 1, token, text="{}"))
    assert registry.sniff(hello) is shm_transport
    assert registry.sniff(msgpack.packb({"method": "Hello"})) is msgpack_transport
    for junk in (b"", b"\x00junk", b"TOY!"):  # nobody claims it: the baseline answers the refusal
        assert registry.sniff(junk) is msgpack_transport


def test_cli_offers_the_registered_transports(capsys):
    from shmrt.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "--transport", "udp"])
    assert "(choose from " + ", ".join(repr(n) for n in registry.TRANSPORTS) + ")" in capsys.readouterr().err


@pytest.fixture
def toy_registered(monkeypatch):
    """The one line a new transport adds to the registry."""
    monkeypatch.setitem(registry.MODULES, "toy", "toy_transport")


def test_a_third_transport_registered_in_one_line_is_served_by_the_unchanged_server_loop(toy_registered,
                                                                                         threaded_echo):
    endpoint, logs = threaded_echo
    hello = toy_transport.TAG + msgpack.packb({"method": "Hello", "seq": 1, "token": b"x" * 16})
    assert registry.sniff(hello) is toy_transport
    with registry.client_transport("toy", endpoint, timeout=10) as t:
        assert isinstance(t, toy_transport.Client)
        assert t.hello(client_info()) == {"echo": True}
        t.open_session(1 << 16)
        t.call("Init").release()
        x = torch.arange(6.0).view(2, 3)
        with t.call("Matmul", [x]) as r:
            assert torch.equal(r.tensors[0], x)
    deadline = time.monotonic() + 10
    while not any("(toy) closed: client closed the session" in m for m in logs):
        assert time.monotonic() < deadline, logs
        time.sleep(0.02)


def test_a_third_transports_refusal_is_in_its_own_format(toy_registered, threaded_echo):
    endpoint, logs = threaded_echo
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(toy_transport.TAG + msgpack.packb({"method": "Matmul", "seq": 4, "token": b"x" * 16}))
        assert sock.poll(10_000), "no answer"
        raw = sock.recv()
    finally:
        sock.close()
    assert raw.startswith(toy_transport.TAG)
    reply = msgpack.unpackb(raw[len(toy_transport.TAG):])
    assert reply["method"] == "Error" and "session refused: no open session" in reply["error"]


def test_without_its_registry_line_a_third_transport_is_not_spoken(threaded_echo):
    endpoint, _ = threaded_echo
    with pytest.raises(SetupError, match="unknown transport 'toy'"):
        registry.client_transport("toy", endpoint, timeout=1)
    with toy_transport.Client(endpoint, timeout=10) as t:  # its bytes reach the server all the same
        with pytest.raises(ProtocolError, match="does not start with"):  # refused in msgpack, not toy
            t.hello(client_info())
