"""Both transports, two processes, real sockets and rings: bit-exact round trips and failures."""
import random
import re
import time

import pytest
import torch

from shmrt.errors import PeerError, PeerTimeout, SetupError, StaleView, TensorTooLarge
from shmrt.host.handler import EchoHandler
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport as make_client_transport
from shmrt.wire.transport import check_endpoint

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
SHAPES = [(), (0,), (1,), (3, 5), (2, 0, 4), (2, 3, 4, 5), (1, 1, 1, 1, 1, 7)]


def random_tensor(shape, dtype, gen):
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 1000).to(dtype)
    return torch.randint(-2**62, 2**62, shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("transport", ["shm", "msgpack"])
def test_round_trip_bit_exact_all_dtypes_and_shapes(echo_daemon, transport):
    gen = torch.Generator().manual_seed(1)
    with make_client_transport(transport, echo_daemon.endpoint, timeout=10) as t:
        assert t.hello(client_info()) == {"echo": True}
        t.open_session(1 << 20)
        with t.call("Init") as r:
            assert r.tensors == []
        for dtype in DTYPES:
            for shape in SHAPES:
                x = random_tensor(shape, dtype, gen)
                with t.call("Matmul", [x, x.clone()]) as r:
                    for got in r.tensors:
                        assert got.dtype == dtype and tuple(got.shape) == shape
                        assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                                           x.view(-1).view(torch.uint8) if x.numel() else x)
                    assert r.stats.sent_bytes >= x.numel() * x.element_size() * 2


def test_shm_staged_tensor_is_sent_without_a_copy(echo_daemon):
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(1 << 20)
        t.call("Init").release()
        with t.request() as req:
            buf = req.alloc((256,))
            buf.copy_(torch.arange(256.0))
            r = t.call("Matmul", [buf])
        with r:
            assert torch.equal(r.view(0), torch.arange(256.0))
            assert r.stats.copy_in_ns == 0
            assert r.stats.payload_sent == 1024


def test_shm_stale_staged_buffer_or_reply_view_raises(echo_daemon):
    """Lifetimes are enforced: a staged buffer feeds only the call its request sends; a reply's views
    end with its with block."""
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(1 << 20)
        t.call("Init").release()
        with t.request() as req:
            buf = req.alloc((64,))
            buf.fill_(1.0)
            t.call("Matmul", [buf]).release()
        with t.request() as req2:               # the next request: its buffers lie in the other half of the ring
            fresh = req2.alloc((64,))
            assert fresh.data_ptr() != buf.data_ptr()
            with pytest.raises(StaleView, match="no open request staged"):
                t.call("Matmul", [buf])         # the request that staged it was sent already
        with pytest.raises(StaleView, match="after its call was sent"):
            req.alloc((4,))
        with t.call("Matmul", [torch.ones(8)]) as r:
            assert torch.equal(r.take(0), torch.ones(8))
        with pytest.raises(StaleView, match="after its release"):
            r.view(0)
        with pytest.raises(StaleView):
            r.take(0)


def test_shm_many_random_calls_wrap_the_rings(echo_daemon):
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(64 * 1024)
        t.call("Init").release()
        for i in range(400):
            x = torch.randn(rng.randrange(0, 6000), generator=gen)
            with t.call("Embedding", [x]) as r:
                assert torch.equal(r.tensors[0], x), f"seed={seed} call={i}"
        assert t.req.producer.head > 10 * t.req.capacity


def _known_session(t, shapes):
    """Open a session and make each call shape's replies known (a reply lands at either lap start: two of each)."""
    t.hello(client_info())
    t.open_session(1 << 16)
    t.call("Init").release()
    for n in shapes:
        for _ in range(4):
            t.call("Matmul", [torch.ones(n)]).release()


@pytest.mark.parametrize("doorbell", ["shm", "zmq"])
@pytest.mark.parametrize("first_released", ["held", "later"])
def test_shm_a_reply_accepted_in_c_and_one_held_with_it_release_in_ring_order(echo_daemon, monkeypatch, doorbell,
                                                                               first_released):
    """A known reply with nothing else out is accepted (and released) in C; a reply taken while it is held is the
    Python consumer's, and the two release the ring in order whichever is released first: the tail word moves only
    over released messages, their bytes are poisoned at release."""
    from shmrt.wire.ring import OFF_TAIL, Consumer
    adopted = []
    adopt = Consumer.adopt
    # (the end C accepted it at: the consumer's accepted_end, which C set)
    monkeypatch.setattr(Consumer, "adopt", lambda self, descs: adopted.append(self.accepted_end) or adopt(self, descs))
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10, doorbell=doorbell) as t:
        _known_session(t, (64, 96))
        consumer, tail = t.rsp.consumer, lambda: t.rsp.native.load(OFF_TAIL)
        for i in range(40):
            adopted.clear()
            held = t.call("Matmul", [torch.full((64,), float(i))])
            # accepted in C at the end its record names
            assert adopted == [t._caller.times.ring_end] and consumer.outstanding == 1
            view = held.view(0)
            later = t.call("Matmul", [torch.full((96,), -float(i))])   # known too, but another reply is out
            assert len(adopted) == 1 and consumer.outstanding == 2
            before = tail()
            assert torch.equal(view, torch.full((64,), float(i)))
            assert torch.equal(later.view(0), torch.full((96,), -float(i)))
            first, second = (held, later) if first_released == "held" else (later, held)
            first.release()
            if first is held:   # the tail moves over the held message only; its bytes poisoned
                assert tail() == adopted[0] and consumer.outstanding == 1 and torch.isnan(view).all()
            else:               # the held message is still out: the tail stays
                assert tail() == before and consumer.outstanding == 2 and not torch.isnan(view).any()
            second.release()
            assert tail() == consumer.accepted_end and consumer.outstanding == 0 and torch.isnan(view).all()
        with t.call("Matmul", [torch.full((64,), 7.0)]) as r:   # alone again: accepted in C
            view = r.view(0)
            assert torch.equal(view, torch.full((64,), 7.0)) and consumer.outstanding == 1
        # released in C: the tail stored there, the bytes poisoned there
        assert consumer.outstanding == 0 and tail() == consumer.accepted_end and torch.isnan(view).all()


@pytest.mark.parametrize("doorbell", ["shm", "zmq"])
def test_shm_replies_released_after_their_session_closed_give_nothing_back(echo_daemon, doorbell):
    """A reply released after close (its rings unmapped, the C caller gone) is a no-op, whether C or Python
    accepted it (C's release used to write into the unmapped ring and freed structs: a crash)."""
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10, doorbell=doorbell) as t:
        _known_session(t, (64, 96))
        adopted = t.call("Matmul", [torch.ones(64)])
        tracked = t.call("Matmul", [torch.ones(96)])   # a second one out: the Python consumer's
        assert t.rsp.consumer.outstanding == 2
    adopted.release()
    tracked.release()
    with pytest.raises(StaleView):
        adopted.view(0)


def test_shm_a_known_reply_whose_ring_end_is_out_of_bounds_is_refused(echo_daemon):
    """A host that moves a known-shaped reply's ring end past the two laps the consumer accepts gets the one-line
    ProtocolError (C does not accept it; the Python consumer words it), nothing released."""
    from shmrt.errors import ProtocolError
    from shmrt.wire import protocol
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10, doorbell="zmq") as t:
        _known_session(t, (64,))
        known = t.known_replies
        receive = t._recv

        def hostile_receive():
            bell = protocol.decode(receive(), capacity=t.rsp.capacity)
            return protocol.encode(bell._replace(ring_end=bell.ring_end + 3 * t.rsp.capacity))
        t._recv = hostile_receive
        with pytest.raises(ProtocolError, match="message end"):
            t.call("Matmul", [torch.ones(64)])
        assert t.known_replies == known and t.rsp.consumer.outstanding == 0


def test_shm_known_reply_views_follow_inference_mode(echo_daemon):
    """A reply shape's views made inside torch.inference_mode are made again outside it, where they can be written
    (an inference tensor cannot be updated in place outside inference mode)."""
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        _known_session(t, (32,))
        with torch.inference_mode():
            for _ in range(4):
                with t.call("Matmul", [torch.ones(32)]) as r:
                    assert r.view(0).is_inference()
        for i in range(4):
            with t.call("Matmul", [torch.full((32,), float(i))]) as r:
                view = r.view(0)
                assert not view.is_inference()
                view.add_(1.0)
                assert torch.equal(view, torch.full((32,), i + 1.0))


@pytest.mark.parametrize("doorbell", ["shm", "zmq"])
def test_shm_a_known_reply_has_its_call_s_stats_and_views_an_out_resized_are_made_again(echo_daemon, doorbell):
    """A reply recognised in C makes its CallStats only when read: they are that call's (method, layer, op, bytes,
    times in order). Its views are made once per reply shape; one an `out=` resized (a misuse torch allows) is made
    again for the next reply, not handed out in its new shape."""
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10, doorbell=doorbell) as t:
        _known_session(t, (256,))
        known = t.known_replies
        x = torch.randn(256)
        with t.call("Matmul", [x], layer=3, op=5) as r:   # a new call shape (layer, op): its replies not known yet
            first = r.stats
        for i in range(4):
            x = torch.randn(256)
            with t.call("Matmul", [x], layer=3, op=5) as r:
                stats = r.stats
                assert r.stats is stats and torch.equal(r.view(0), x)
                with pytest.warns(UserWarning, match="resized"):
                    torch.mul(torch.ones(4), 2.0, out=r.view(0))   # now a (4,) view over the reply's first bytes
            assert (stats.method, stats.layer, stats.op, stats.transport) == ("Matmul", 3, 5, "shm")
            assert stats.payload_sent == stats.payload_recv == 1024 == first.payload_sent
            assert (stats.sent_bytes, stats.recv_bytes) == (first.sent_bytes, first.recv_bytes)
            assert stats.t_start <= stats.t_encoded <= stats.t_sent <= stats.t_replied <= stats.t_decoded
            assert 0 < stats.copy_in_ns <= stats.t_encoded - stats.t_start and stats.work_ns >= 0
        assert t.known_replies >= known + 2


def test_oversize_tensor_is_a_clear_error(echo_daemon):
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(64 * 1024)
        t.call("Init").release()
        with pytest.raises(TensorTooLarge, match="--ring-mib"):
            t.call("Matmul", [torch.zeros(100_000)])


def test_silent_peer_times_out_naming_the_endpoint(endpoint):
    with make_client_transport("shm", endpoint, timeout=0.5) as t:
        with pytest.raises(PeerTimeout, match=re.escape(endpoint)):
            t.hello(client_info())


def test_daemon_reports_protocol_errors_and_drops_the_session(echo_daemon):
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(1 << 16)
        with pytest.raises(PeerError, match="before Init"):
            t.call("Matmul", [torch.ones(3)])


def test_enclave_mode_refuses_ipc_endpoints():
    with pytest.raises(SetupError, match="tcp://127.0.0.1"):
        check_endpoint("ipc:///tmp/x.sock", enclave=True)
    assert check_endpoint("tcp://127.0.0.1:5555", enclave=True)


def test_tcp_round_trip(tmp_path):
    import socket
    from conftest import EchoDaemon
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = EchoDaemon(f"tcp://127.0.0.1:{port}")
    try:
        for name in ("shm", "msgpack"):
            with make_client_transport(name, d.endpoint, timeout=10, enclave=True) as t:
                t.hello(client_info())
                t.open_session(1 << 16)
                t.call("Init").release()
                with t.call("LMHead", [torch.arange(10.0)]) as r:
                    assert torch.equal(r.tensors[0], torch.arange(10.0))
    finally:
        d.stop()


OVERSIZE_CLIENT = r"""
import resource, sys
from shmrt.errors import ShmrtError
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport as make_client_transport
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with make_client_transport(sys.argv[1], sys.argv[2], timeout=2) as t:
    try:
        t.hello(client_info())
        print("answered")
    except ShmrtError as exc:
        print(type(exc).__name__)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("transport", ["shm", "msgpack"])
def test_a_reply_past_the_message_size_limit_is_dropped_not_buffered(endpoint, transport):
    """A 100 MiB answer to Hello: ZeroMQ refuses it at MAXMSGSIZE (a doorbell, or a control message for
    msgpack) and drops the connection; the client hears the connection closed (at once: it no longer waits out its
    timeout) and never holds the bytes."""
    import subprocess
    import sys
    import zmq
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    client = subprocess.Popen([sys.executable, "-c", OVERSIZE_CLIENT, transport, endpoint], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert router.poll(30_000), "the client never sent Hello"
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, b"SHMD" + bytes(100 << 20)])
        out, _ = client.communicate(timeout=60)
    finally:
        client.kill()
        router.close()
    outcome, grown_mib = out.split()
    assert outcome == "PeerError"
    assert int(grown_mib) < 40, f"client peak RSS grew by {grown_mib} MiB"


# ---- Attach: ring attachment is its own control message (shm only)

def _attach_text(req: str, rsp: str, capacity: int = 1 << 16) -> str:
    import json
    return json.dumps({"req": req, "rsp": rsp, "capacity": capacity})


def test_shm_request_before_attach_is_refused_naming_attach(echo_daemon):
    from shmrt.wire.protocol import Method
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        with pytest.raises(PeerError, match=r"Init before Attach: no rings attached"):
            t._control(Method.Init)


def test_shm_attach_twice_is_refused(echo_daemon):
    from shmrt.wire.protocol import Method
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        t.open_session(1 << 16)  # sends Attach
        with pytest.raises(PeerError, match="Attach sent twice"):
            t._control(Method.Attach, _attach_text(t.req.name, t.rsp.name, t.req.capacity))


@pytest.mark.parametrize("req,rsp", [("/etc/passwd", "/shmrt-" + "0" * 32 + "-rsp"),
                                     ("/shmrt-" + "0" * 32 + "-req", "../../dev/mem"),
                                     (None, 7)])
def test_shm_attach_naming_bad_segments_is_refused(echo_daemon, req, rsp):
    from shmrt.wire.protocol import Method
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        with pytest.raises(PeerError, match="is not a shmrt ring name"):
            t._control(Method.Attach, _attach_text(req, rsp))


def test_shm_attach_naming_missing_segments_is_refused(echo_daemon):
    from shmrt.wire.protocol import Method
    with make_client_transport("shm", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        with pytest.raises(PeerError):
            t._control(Method.Attach, _attach_text("/shmrt-" + "0" * 32 + "-req", "/shmrt-" + "0" * 32 + "-rsp"))


def test_msgpack_has_no_attach(echo_daemon):
    with make_client_transport("msgpack", echo_daemon.endpoint, timeout=10) as t:
        t.hello(client_info())
        with pytest.raises(PeerError, match="method 'Attach'"):
            t._roundtrip({"method": "Attach", "seq": t._next_seq(), "token": t.token, "text": "{}"})


@pytest.mark.parametrize("transport,doorbell", [("shm", "shm"), ("shm", "zmq"), ("msgpack", None)])
def test_observers_do_their_bookkeeping_while_a_call_is_out(echo_daemon, transport, doorbell):
    """An observer's `idle()` runs once per call, after its bell is rung and before the reply is taken, and sees
    every earlier call already notified (the perf log formats their rows there, off the critical path)."""
    from shmrt.wire.native import now_ns
    events = []

    class Observer:
        def __call__(self, stats):
            events.append(("call", stats))

        def idle(self):
            events.append(("idle", now_ns()))

    with make_client_transport(transport, echo_daemon.endpoint, timeout=10, doorbell=doorbell) as t:
        t.hello(client_info())
        t.open_session(1 << 20)
        t.call("Init").release()
        t.observers.append(Observer())
        for i in range(3):
            t.call("Matmul", [torch.full((4,), float(i))]).release()
    assert [kind for kind, _ in events] == ["idle", "call"] * 3
    for (_, idle_ns), (_, stats) in zip(events[::2], events[1::2]):
        assert stats.t_sent <= idle_ns <= stats.t_replied


class LateCopies(EchoHandler):
    """An echo handler whose copies complete only in `settle`, as a CUDA daemon's DMA does at its synchronize."""

    overlaps_device = True

    def __init__(self):
        self.pending = []

    def handle(self, request, builder, session, settle=True):
        if request.method == "Init":
            return super().handle(request, builder, session, settle)
        for t in request.tensors:   # views on the request ring: read when the "device" gets to them
            out = builder.alloc(t.shape, t.dtype)
            out.fill_(float("nan"))
            self.pending.append((out, t))
        if settle:
            self.settle(session)
        return "late"

    def settle(self, session):
        time.sleep(0.003)   # the device still at work
        for out, t in self.pending:
            out.copy_(t)
        self.pending.clear()


def _serve_late_copies(endpoint):
    from shmrt.host.server import Server
    with Server(endpoint, LateCopies(), log=lambda m: None) as server:
        server.serve()


@pytest.fixture
def late_copies_daemon(endpoint):
    from conftest import CHILDREN
    proc = CHILDREN.Process(target=_serve_late_copies, args=(endpoint,), daemon=True)
    proc.start()
    yield endpoint
    proc.terminate()
    proc.join(5)


@pytest.mark.parametrize("transport,doorbell", [("shm", "shm"), ("shm", "zmq"), ("msgpack", None)])
def test_a_reply_is_sent_after_the_handler_settles_and_its_work_time_counts_the_wait(late_copies_daemon, transport,
                                                                                     doorbell):
    """A daemon that overlaps a device (CUDA: copies queued, one synchronize) has its shm reply's doorbell encoded
    while the copies run: the request must stay unreleased (released memory is poisoned: NaN) and the reply unsent
    until the handler settled, and the reply's work time covers that wait."""
    with make_client_transport(transport, late_copies_daemon, timeout=10, doorbell=doorbell) as t:
        t.hello(client_info())
        t.open_session(1 << 16)
        t.call("Init").release()
        for i in range(40):   # through the rings' wrap; then calls of one shape (their replies are known in C)
            x = torch.randn(1000 + 37 * i if i < 30 else 1000)
            with t.call("Matmul", [x]) as r:
                assert torch.equal(r.view(0), x) and r.text == "late"   # (a reply with a text is never a known one)
                assert r.stats.work_ns >= 3_000_000


def test_a_staged_input_is_described_where_it_lies_in_the_shape_it_is_sent_in():
    """describe_input: the staged buffer itself (its record as staged, no copy), a view of it in another shape (the
    same bytes, that shape), and anything else (another dtype: one converting copy to a new place)."""
    from shmrt.wire.ring import Ring
    from shmrt.wire.shm_transport import describe_input, reserve_view
    with Ring.create(1 << 16, "req") as ring:
        desc, staged = reserve_view(ring, (1, 1, 64), torch.float32, 1.0, "x")
        staged.copy_(torch.arange(64.0).view(1, 1, 64))
        assert describe_input(ring, staged, desc, None, 1.0) == (desc, 0)
        as_rows, copied = describe_input(ring, staged.view(4, 16), desc, None, 1.0)
        assert (as_rows.offset, as_rows.nbytes, as_rows.shape, copied) == (desc.offset, desc.nbytes, (4, 16), 0)
        halved, _ = describe_input(ring, staged, desc, torch.bfloat16, 1.0)   # the staged desc holds float32
        assert halved == desc                                                  # staged: sent as it lies
        other, _ = describe_input(ring, staged.to(torch.float64), desc, torch.float32, 1.0)
        assert other.offset != desc.offset and other.dtype == torch.float32 and other.shape == (1, 1, 64)
        assert torch.equal(ring.tensor(other.offset, other.nbytes, torch.float32, other.shape), staged)
