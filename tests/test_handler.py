"""The daemon's method table: one dispatcher enforces each row's arity and Init-first; the model's table
covers every RPC the wire knows; a session is typed state the daemon closes."""
from types import SimpleNamespace

import pytest
import torch

from shmrt.errors import ProtocolError
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler, ModelSession
from shmrt.host.handler import Call, EchoHandler, Handler, table
from shmrt.host.weights import load_weights
from shmrt.wire.protocol import RPC_METHODS
from shmrt.wire.transport import ReplyBuilder, Request


class Builder(ReplyBuilder):
    capacity = 1 << 20

    def __init__(self):
        self.tensors = []

    def alloc(self, shape, dtype):
        self.tensors.append(torch.empty(shape, dtype=dtype))
        return self.tensors[-1]


class Recording(Handler):
    """A handler whose table has a two-tensor call, recording what its compute function saw."""

    def __init__(self):
        self.seen = []

    def _init(self, session, request, builder):
        pass

    def _fused(self, session, request, builder):
        self.seen.append(request.method)
        a, b = request.tensors
        builder.alloc(a.shape, a.dtype).copy_(a + b)

    calls = table(Call("Init", 0, _init), Call("Matmul", 2, _fused))


def _opened(handler):
    session = handler.open({}, lambda: [])
    handler.handle(Request("Init", 1), Builder(), session)
    return session


@pytest.mark.parametrize("n", [0, 1, 3])
def test_a_rows_arity_is_enforced_before_its_compute_runs(n):
    h = Recording()
    session = _opened(h)
    with pytest.raises(ProtocolError, match=f"Matmul takes 2 tensor\\(s\\), got {n}"):
        h.handle(Request("Matmul", 2, tensors=[torch.ones(2)] * n), Builder(), session)
    assert h.seen == []
    builder = Builder()
    h.handle(Request("Matmul", 3, tensors=[torch.ones(2), torch.ones(2)]), builder, session)
    assert h.seen == ["Matmul"] and torch.equal(builder.tensors[0], torch.full((2,), 2.0))


def test_calls_before_init_and_a_second_init_are_refused():
    h = Recording()
    session = h.open({}, lambda: [])
    with pytest.raises(ProtocolError, match="Matmul before Init"):
        h.handle(Request("Matmul", 1, tensors=[torch.ones(1)] * 2), Builder(), session)
    with pytest.raises(ProtocolError, match=r"Init takes 0 tensor\(s\), got 1"):
        h.handle(Request("Init", 1, tensors=[torch.ones(1)]), Builder(), session)
    h.handle(Request("Init", 2), Builder(), session)
    with pytest.raises(ProtocolError, match="Init sent twice"):
        h.handle(Request("Init", 3), Builder(), session)


def test_a_method_without_a_row_is_refused_naming_the_served_ones():
    h = Recording()
    with pytest.raises(ProtocolError, match=r"method LMHead is not served here \(expected one of \['Init', 'Matmul'\]\)"):
        h.handle(Request("LMHead", 2, tensors=[torch.ones(1)]), Builder(), _opened(h))


def test_a_table_names_only_rpcs_the_wire_knows_and_each_once():
    with pytest.raises(AssertionError):
        table(Call("Attach", 0, None))
    with pytest.raises(AssertionError):
        table(Call("Init", 0, None), Call("Init", 0, None))


@pytest.fixture(scope="module")
def model_handler():
    return ModelHandler(LinearCompute(load_weights("tiny"), "cpu", torch.float32), "tiny", "0" * 64,
                        log=lambda m: None)


def test_the_model_table_has_one_row_per_rpc_with_its_arity(model_handler):
    assert set(model_handler.calls) == set(RPC_METHODS)
    assert {n: c.arity for n, c in model_handler.calls.items()} == \
        {"Init": 0, "Embedding": 1, "BatchLinear": 1, "Matmul": (1, 2), "LMHead": 1, "AttentionOutput": (1, 2),
         "AttentionScores": 2}
    assert set(EchoHandler.calls) == set(RPC_METHODS) and EchoHandler.calls["Matmul"].arity is None


def test_model_arity_is_enforced(model_handler):
    session = _opened(model_handler)
    with pytest.raises(ProtocolError, match=r"Matmul takes 1 or 2 tensor\(s\), got 3"):
        model_handler.handle(Request("Matmul", 2, layer=0, tensors=[torch.ones(1, 2, 3, 16)] * 3), Builder(), session)
    with pytest.raises(ProtocolError, match="Matmul with one tensor takes its other factor from the daemon's K/V cache"):
        model_handler.handle(Request("Matmul", 2, layer=0, tensors=[torch.ones(1, 2, 3, 16)]), Builder(), session)
    with pytest.raises(ProtocolError, match=r"AttentionOutput takes 1 or 2 tensor\(s\), got 0"):
        model_handler.handle(Request("AttentionOutput", 2, layer=0, tensors=[]), Builder(), session)
    with pytest.raises(ProtocolError, match=r"LMHead takes 1 tensor\(s\), got 2"):
        model_handler.handle(Request("LMHead", 3, tensors=[torch.ones(1, 64)] * 2), Builder(), session)
    builder = Builder()
    model_handler.handle(Request("LMHead", 4, tensors=[torch.ones(1, 64)]), builder, session)
    assert builder.tensors[0].shape == (1, 512)


def test_model_session_is_typed_and_closes(model_handler):
    session = model_handler.open({"wire_dtype": "bfloat16"}, lambda: [])
    assert isinstance(session, ModelSession) and session.wire == torch.bfloat16 and session.kv is None
    model_handler.handle(Request("Init", 1), Builder(), session)
    assert session.kv is not None and session.registration is None  # CPU: nothing to register
    session.close()
    assert session.kv is None
    with pytest.raises(ProtocolError, match="wire_dtype torch.int64 is not a floating type"):
        model_handler.open({"wire_dtype": "int64"}, lambda: [])


def test_init_registers_what_the_transport_pins_and_close_releases_it(model_handler, monkeypatch):
    """The CUDA path without a GPU: Init hands the transport's pinned buffers (both ring mappings on shm,
    none on msgpack) to the host registration; closing the session releases it."""
    import shmrt.host.daemon as daemon
    from shmrt.wire.msgpack_transport import MsgpackServerSession
    from shmrt.wire.ring import Ring
    from shmrt.wire.shm_transport import ShmServerSession
    registered, released = [], []

    class FakeRegistration:
        def __init__(self, buffers, log):
            registered.append(list(buffers))
            self.pointers = []   # nothing registered: no decode graphs either

        def release(self):
            released.append(True)

    monkeypatch.setattr(daemon, "HostRegistration", FakeRegistration)
    monkeypatch.setattr(model_handler, "cuda", True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with Ring.create(1 << 16, "req") as req, Ring.create(1 << 16, "rsp") as rsp:
        shm = ShmServerSession(b"k" * 16)
        shm.req, shm.rsp = Ring.attach(req.name, 1 << 16), Ring.attach(rsp.name, 1 << 16)
        try:
            session = model_handler.open({}, shm.pinned_buffers)
            model_handler.handle(Request("Init", 2), Builder(), session)
            assert [(b.address, b.nbytes) for b in registered[0]] == \
                [(shm.req.native.address, shm.req.native.nbytes), (shm.rsp.native.address, shm.rsp.native.nbytes)]
            session.close()
            assert released == [True] and session.registration is None
        finally:
            shm.close()
    session = model_handler.open({}, MsgpackServerSession(b"k" * 16).pinned_buffers)
    model_handler.handle(Request("Init", 2), Builder(), session)
    assert registered[1] == []
    session.close()


def test_a_call_waits_for_the_device_once_after_every_result_is_queued_also_when_it_fails(model_handler, monkeypatch):
    """The CUDA path without a GPU: result copies are queued non-blocking, and `handle` synchronizes the
    device exactly once, after the last one (the server releases the request right after), and also
    when the call raises midway."""
    import shmrt.host.daemon as daemon
    from shmrt.model.calls import projection_bits
    events = []

    class LoggingBuilder(Builder):
        def alloc(self, shape, dtype):
            events.append("alloc")
            return super().alloc(shape, dtype)

    class Stream:
        def synchronize(self):
            events.append("sync")

    monkeypatch.setattr(daemon, "HostRegistration", lambda buffers, log: SimpleNamespace(pointers=[]))
    monkeypatch.setattr(model_handler, "cuda", True)
    monkeypatch.setattr(model_handler, "_stream", Stream())
    session = _opened(model_handler)
    events.clear()
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    builder = LoggingBuilder()
    qkv = projection_bits(["q_proj", "k_proj", "v_proj"])
    model_handler.handle(Request("BatchLinear", 2, layer=1, op=qkv, tensors=[x]), builder, session)
    assert events == ["alloc"] * 3 + ["sync"]
    weight = model_handler.c.w.layers[1].fused[("q_proj", "k_proj", "v_proj")]
    assert torch.allclose(torch.cat(builder.tensors, -1), x @ weight.t(), rtol=0, atol=1e-6)
    events.clear()
    with pytest.raises(ProtocolError, match="layer 5 out of range"):
        model_handler.handle(Request("BatchLinear", 3, layer=5, op=qkv, tensors=[x]), LoggingBuilder(), session)
    assert events == ["sync"]
    # the server's way (settle=False): it settles itself, after it has encoded the reply; so no wait here, also
    # when the call fails (the server's `finally` settles then)
    assert model_handler.overlaps_device is False   # set at construction: this one was built for a CPU
    events.clear()
    model_handler.handle(Request("BatchLinear", 4, layer=1, op=qkv, tensors=[x]), LoggingBuilder(), session, settle=False)
    with pytest.raises(ProtocolError, match="layer 5 out of range"):
        model_handler.handle(Request("BatchLinear", 5, layer=5, op=qkv, tensors=[x]), LoggingBuilder(), session,
                             settle=False)
    assert events == ["alloc"] * 3
    model_handler.settle(session)
    assert events == ["alloc"] * 3 + ["sync"]


def test_results_travel_in_the_sessions_wire_dtype(model_handler):
    from shmrt.model.calls import projection_bits
    session = model_handler.open({"wire_dtype": "bfloat16"}, lambda: [])
    model_handler.handle(Request("Init", 1), Builder(), session)
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    builder = Builder()
    model_handler.handle(Request("BatchLinear", 2, layer=0, op=projection_bits(["gate_proj", "up_proj"]), tensors=[x]),
                         builder, session)
    weight = model_handler.c.w.layers[0].fused[("gate_proj", "up_proj")]
    expect = (x.float() @ weight.t()).to(torch.bfloat16)
    assert [t.dtype for t in builder.tensors] == [torch.bfloat16] * 2
    assert torch.equal(torch.cat(builder.tensors, -1), expect)


@pytest.mark.parametrize("keep_v", [False, True])
@pytest.mark.parametrize("S", [1, 3])
def test_a_fused_projection_reaches_the_ring_whole_or_in_parts(model_handler, monkeypatch, S, keep_v):
    """Over a real response ring: one row's q|k|v (q|k where V's rows stay in the cache) goes in as one copy of
    the fused product, several rows part by part (their q, k and v interleave in the product); either way
    each result holds its projection, and kept V rows are in the cache."""
    from shmrt.model.calls import projection_bits
    from shmrt.wire.ring import Ring
    from shmrt.wire.shm_transport import ShmReplyBuilder, ring_view
    session = _opened(model_handler)
    x = torch.randn(1, S, 64, generator=torch.Generator().manual_seed(S))
    names = ["q_proj", "k_proj", "v_proj"]
    sent = names[:2] if keep_v else names
    with Ring.create(1 << 16, "rsp") as ring:
        base, copies, copy = ring.native.address, [], torch.Tensor.copy_

        def counting_copy(dst, src, *args, **kwargs):
            if base <= dst.data_ptr() < base + ring.native.nbytes:
                copies.append(dst.numel())
            return copy(dst, src, *args, **kwargs)

        builder = ShmReplyBuilder(ring, timeout=1.0)
        monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
        model_handler.handle(Request("BatchLinear", 2, layer=1, op=projection_bits(names, keep_v), pos=0, tensors=[x]),
                             builder, session)
        monkeypatch.undo()
        got = [ring_view(ring, d) for d in builder.descs]
        assert len(got) == len(sent) and len(copies) == (1 if S == 1 else len(sent))
        for name, t in zip(sent, got):
            assert torch.allclose(t, x @ model_handler.c.w.projection(1, [name]).t(), rtol=0, atol=1e-6), name
        if keep_v:
            v = (x @ model_handler.c.w.projection(1, ["v_proj"]).t()).view(1, S, 2, 16).transpose(1, 2)
            assert torch.allclose(session.kv.rows(1, "v"), v, rtol=0, atol=1e-6)
        del got


def test_a_batch_linear_the_session_graphs_ran_is_not_computed_again_and_keeps_its_v_rows(model_handler):
    """The CUDA graph branch without a GPU: where the session's graphs ran a call, the handler neither computes
    it eagerly nor loses V's rows (they go into the cache at `pos`); where they did not, it computes eagerly."""
    from shmrt.model.calls import projection_bits
    cfg = model_handler.c.cfg
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    seen = []

    class Graphs:
        ran = True

        def replay_planned(self, request, builder, kv):   # (these requests name no ring places: never planned)
            return False

        def linear(self, layer, names, rows, x, outs, joined, dtype, drop_v):
            seen.append((layer, names, rows, tuple(x.shape), [tuple(o.shape) for o in outs], dtype, drop_v))
            if not self.ran:
                return None, None
            for out in outs:
                out.fill_(7.0)
            return object(), torch.full((1, 1, kv_rows), 3.0)   # the graph that ran; V's rows (KEEP_V: no plan)

    session = _opened(model_handler)
    session.graphs = Graphs()
    x = torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    qkv = projection_bits(["q_proj", "k_proj", "v_proj"], keep_v=True)
    builder = Builder()
    model_handler.handle(Request("BatchLinear", 2, layer=1, op=qkv, pos=0, tensors=[x]), builder, session)
    q_rows, k_rows = cfg.num_attention_heads * cfg.head_dim, kv_rows
    assert seen == [(1, ("q_proj", "k_proj", "v_proj"), [q_rows, k_rows, kv_rows], (1, 1, cfg.hidden_size),
                     [(1, 1, q_rows), (1, 1, k_rows)], torch.float32, True)]
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in builder.tensors)    # the graph's, untouched
    assert torch.equal(session.kv.rows(1, "v"), torch.full((1, cfg.num_key_value_heads, 1, cfg.head_dim), 3.0))
    session.graphs.ran = False
    builder = Builder()
    model_handler.handle(Request("BatchLinear", 3, layer=1, op=qkv, pos=1, tensors=[x]), builder, session)
    weight = model_handler.c.w.layers[1].fused[("q_proj", "k_proj", "v_proj")]
    expected = x @ weight.t()
    assert torch.allclose(torch.cat(builder.tensors, -1), expected[..., :q_rows + k_rows], rtol=0, atol=1e-6)
    assert torch.allclose(session.kv.rows(1, "v")[:, :, 1].flatten(), expected[0, 0, q_rows + k_rows:], atol=1e-6)


def test_attention_scores_the_session_graphs_rotated_keep_their_rows_and_score_against_the_cache(model_handler):
    """The CUDA graph branch of AttentionScores without a GPU: where the session's graphs gave q, k and v, the
    handler keeps those K and V rows at `pos` and multiplies that q with the K cache; where they did not, it
    computes the call eagerly."""
    cfg = model_handler.c.cfg
    Hkv, hd, g = cfg.num_key_value_heads, cfg.head_dim, cfg.groups
    seen = []

    class Graphs:
        def __init__(self):
            self.out = None

        def rotation(self, layer, rows, x, tables):
            seen.append((layer, tuple(x.shape), tuple(tables.shape)))
            return self.out

        def replay_planned(self, request, builder, kv):
            return False

        def scores(self, *args):   # unpadded calls: never a whole graph's
            return None

    session = _opened(model_handler)
    session.graphs = Graphs()
    gen = torch.Generator().manual_seed(3)
    x, tables = torch.randn(1, 1, cfg.hidden_size, generator=gen), torch.randn(4, 1, hd, generator=gen)
    builder = Builder()
    model_handler.handle(Request("AttentionScores", 2, layer=1, pos=0, tensors=[x, tables]), builder, session)
    expected = model_handler.c.attention_scores(1, x, tables, pos=0, kv=model_handler.c.new_kv_store())
    assert seen == [(1, (1, 1, cfg.hidden_size), (4, 1, hd))] and torch.allclose(builder.tensors[0], expected, atol=1e-6)
    q, k, v = torch.randn(1, Hkv, g, hd, generator=gen), torch.randn(1, Hkv, 1, hd, generator=gen), \
        torch.randn(1, 1, Hkv * hd, generator=gen)
    session.graphs.out = (q, k, v)
    builder = Builder()
    model_handler.handle(Request("AttentionScores", 3, layer=1, pos=1, tensors=[x, tables]), builder, session)
    keys = session.kv.rows(1, "k")
    assert keys.shape[2] == 2 and torch.equal(keys[:, :, 1:], k)
    assert torch.equal(session.kv.rows(1, "v")[:, :, 1].flatten(), v.flatten())
    assert torch.allclose(builder.tensors[0], q @ keys.transpose(-1, -2), atol=1e-6)
