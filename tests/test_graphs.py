"""Decode-step BatchLinear and AttentionScores calls as CUDA graphs copying from (and to) registered rings
(host/graphs.py): the same bytes as the eager path, graphs really used, and a call at another address run eagerly.
GPU only."""
import contextlib

import pytest
import torch

from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.weights import load_weights
from shmrt.model.calls import matmul_bits, projection_bits
from shmrt.wire.ring import Ring
from shmrt.wire.shm_transport import ShmReplyBuilder, ring_view, reserve_view
from shmrt.wire.transport import Request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CALLS = [(["q_proj", "k_proj", "v_proj"], True), (["gate_proj", "up_proj"], False), (["down_proj"], False),
         (["q_proj", "k_proj", "v_proj"], False)]


class Rings:
    """A client's two rings and the daemon's attachments of them, driven by hand: one call at a time."""

    def __init__(self, capacity=1 << 16):
        self.req, self.rsp = Ring.create(capacity, "req"), Ring.create(capacity, "rsp")
        self.d_req, self.d_rsp = Ring.attach(self.req.name, capacity), Ring.attach(self.rsp.name, capacity)

    def pinned(self):
        return [self.d_req.native, self.d_rsp.native]

    def call(self, handler, session, seq, names, keep_v, x, layer, pos, hold=None):
        """One BatchLinear: x into the request ring, served, the reply copied out (and released)."""
        return self.serve(handler, session, Request("BatchLinear", seq, layer, projection_bits(names, keep_v), pos),
                          [x], hold)

    def serve(self, handler, session, request, tensors, hold=None):
        """`request` with `tensors` put into the request ring, served, the reply copied out (and released)."""
        descs = []
        for t in tensors:
            desc, view = reserve_view(self.req, t.shape, t.dtype, 1.0, "input")
            view.copy_(t)
            descs.append(desc)
        entry = self.d_req.consumer.accept(self.req.producer.publish())
        builder = ShmReplyBuilder(self.d_rsp, 1.0)
        request.tensors = [ring_view(self.d_req, d) for d in descs]
        handler.handle(request, builder, session)
        request.tensors = []   # views on a ring this test unmaps: none left for a failure report to print
        self.d_req.consumer.release(entry)
        reply = self.rsp.consumer.accept(self.d_rsp.producer.publish())
        out = [ring_view(self.rsp, d).clone() for d in builder.descs]
        offsets = [d.offset for d in builder.descs]
        if hold is None:
            self.rsp.consumer.release(reply)
        else:
            hold.append(reply)
        return out, offsets

    def close(self):
        for ring in (self.d_req, self.d_rsp, self.req, self.rsp):
            ring.close()


def _handler(weights):
    return ModelHandler(LinearCompute(weights, "cuda", torch.float32), "tiny", "0" * 64, log=print)


@contextlib.contextmanager
def opened(monkeypatch, weights, wire: str, graphs: str):
    """(handler, rings, session): a session over a fresh pair of rings, Init run, graphs on ("1") or off ("0")."""
    monkeypatch.setenv("SHMRT_CUDA_GRAPHS", graphs)
    handler, rings = _handler(weights), Rings()
    try:
        session = handler.open({"wire_dtype": wire}, rings.pinned)
        handler.handle(Request("Init", 2), None, session)
        yield handler, rings, session
        session.close()   # graphs and registration first: they hold the rings' addresses
    finally:
        rings.close()


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_decode_linears_replay_as_graphs_with_the_eager_paths_bytes(monkeypatch, wire):
    weights = load_weights("tiny", device="cuda")
    dtype = getattr(torch, wire)
    D = weights.cfg.hidden_size
    results = {}
    for graphs in ("1", "0"):
        with opened(monkeypatch, weights, wire, graphs) as (handler, rings, session):
            assert (session.graphs is not None) == (graphs == "1")
            got, seq, gen = [], 3, torch.Generator().manual_seed(0)
            for pos in range(6):
                for layer in range(weights.cfg.num_hidden_layers):
                    for names, keep_v in CALLS:
                        x = torch.randn(1, 1, D if names[0] != "down_proj" else weights.cfg.intermediate_size,
                                        generator=gen).to(dtype)
                        out, offsets = rings.call(handler, session, seq, names, keep_v, x, layer, pos)
                        assert offsets[0] in rings.rsp.lap_starts   # the ring was empty: one of two addresses
                        got.append(out)
                        seq += 1
            held = []   # a reply kept: the next one lies past it, where no graph reads or writes: eager
            got.append(rings.call(handler, session, seq, ["down_proj"], False,
                                  torch.ones(1, 1, weights.cfg.intermediate_size).to(dtype), 0, 0, held)[0])
            shifted, offsets = rings.call(handler, session, seq + 1, ["down_proj"], False,
                                          torch.ones(1, 1, weights.cfg.intermediate_size).to(dtype), 0, 0)
            assert offsets[0] > 0
            got.append(shifted)
            v_cache = session.kv.rows(0, "v").cpu()
            if graphs == "1":
                assert session.graphs.on and len(session.graphs.graphs) == 4 * weights.cfg.num_hidden_layers
            results[graphs] = got, v_cache
    (with_graphs, v_graphs), (eager, v_eager) = results["1"], results["0"]
    assert len(with_graphs) == len(eager)
    for a, b in zip(with_graphs, eager):
        for x, y in zip(a, b):
            assert x.dtype == dtype and torch.equal(x, y)
    assert v_graphs.shape[2] == 6 and torch.equal(v_graphs, v_eager)   # V's rows kept at their positions


@pytest.mark.parametrize("step", [1, 8])
@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_attention_calls_replay_as_graphs_with_the_eager_paths_bytes(monkeypatch, wire, step):
    """Decode steps of AttentionScores then AttentionOutput (P alone). Unpadded (step 1): AttentionScores' copies
    in, q|k|v and RoPE replayed, the rest eager. Padded to a multiple of `step` (model/calls.py): both calls
    replayed whole, K/V rows kept by the graph at the step's position, a new graph when the width moves on. The
    same replies and cache rows, step after step, as with graphs off."""
    from shmrt.enclave.llama import rope_tables
    from shmrt.model.calls import padded_width
    from shmrt.model.config import rope_inv_freq
    weights = load_weights("tiny", device="cuda")
    cfg, dtype = weights.cfg, getattr(torch, wire)
    inv_freq, scaling = rope_inv_freq(cfg)
    Hkv, g = cfg.num_key_value_heads, cfg.groups
    results = {}
    monkeypatch.setattr("shmrt.host.graphs.SCORE_WIDTH_STEP", 8)   # the step the daemon replays
    for graphs in ("1", "0"):
        with opened(monkeypatch, weights, wire, graphs) as (handler, rings, session):
            got, seq, gen = [], 3, torch.Generator().manual_seed(1)
            for pos in range(12):                       # with step 8: widths 8 and 16, a new graph at pos 8
                width = padded_width(pos + 1, step)
                tables = rope_tables(inv_freq, pos, 1, scaling, cfg.head_dim ** -0.5).packed
                for layer in range(cfg.num_hidden_layers):
                    x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(dtype)
                    request = Request("AttentionScores", seq, layer, width if step > 1 else 0, pos)
                    (scores,), _ = rings.serve(handler, session, request, [x, tables])
                    assert scores.shape == (1, Hkv, g, width) and not scores[..., pos + 1:].any()   # zero rows
                    p = torch.zeros(1, Hkv, g, width)
                    p[..., :pos + 1] = torch.softmax(scores[..., :pos + 1].float(), -1)
                    (out,), _ = rings.serve(handler, session, Request("AttentionOutput", seq + 1, layer,
                                                                      matmul_bits(False, "v"), pos), [p.to(dtype)])
                    got += [scores, out]
                    seq += 2
            if graphs == "1":
                kinds = {key[0] for key in session.graphs.graphs}   # unpadded: P 8 wide once (pos 7) is a graph's too
                assert session.graphs.on and kinds == {"AttentionScores", "AttentionOutput"}
                if step > 1:   # one graph per layer, kind and lap start met, for the current width only
                    assert len(session.graphs.graphs) <= 2 * 2 * cfg.num_hidden_layers
                    assert all(key[-1] == 16 for key in session.graphs.graphs if key[0] == "AttentionScores")
                    kept = {b.data_ptr() for w in ("k", "v") for b in session.kv.buffers[w]}   # the store's buffers
                    assert all(held <= kept for families in session.graphs.families.values()
                               for _, held in families.values())   # no graph keeps one the store let go
            results[graphs] = got, [session.kv.rows(1, w).cpu() for w in ("k", "v")]
    (with_graphs, cache_graphs), (eager, cache_eager) = results["1"], results["0"]
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(with_graphs, eager))
    assert all(a.shape[2] == 12 and torch.equal(a, b) for a, b in zip(cache_graphs, cache_eager))
