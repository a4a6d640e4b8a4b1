"""host/graphs.py's routes on a CPU: the daemon's handler driven through real rings (the in-process caller), its
session given graphs whose capture is a stand-in that runs the captured body again on replay. That body reads the
request ring and writes the reply at the addresses a CUDA graph would, so what this checks is everything but
CUDA: which calls take a graph, the keys and families, lap starts, the position word, K/V commits and zeroing,
the drop of graphs holding let-go K/V buffers. Values against transformers; GPU runs of the same: test_graphs.py."""
import random
import struct

import pytest
import torch

from conftest import random_ids
from shmrt.enclave.generate import Sampler, generate
from shmrt.enclave.llama import EnclaveModel
from shmrt.enclave.ops import RemoteOps
from shmrt.errors import ProtocolError, ShmrtError
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.graphs import RerunCapture, SessionGraphs
from shmrt.host.inprocess import InProcessCaller
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import load_enclave_part


@pytest.mark.parametrize("calls,step", [("fewest", 8), ("fewest", 1), ("v2.4", 8)])
def test_graph_routes_give_transformers_tokens_and_are_taken(checkpoints, calls, step, monkeypatch):
    served = _counting(monkeypatch)
    path, hf = checkpoints["gqa-tied-llama3"]
    w = load_weights(str(path))
    handler = ModelHandler(LinearCompute(w, "cpu", torch.float32), "test", "", log=lambda m: None)
    with InProcessCaller(handler, torch.float32, 256 << 10) as caller:
        req, rsp = caller.req.native, caller.rsp.native
        graphs = caller.session.graphs = SessionGraphs(handler.c, None, req.message_starts, rsp.message_starts,
                                                       log=print, capture=RerunCapture)
        graphs.width_step = max(step, 1)   # the padding a CUDA daemon asks for (256) and replays whole, here smaller
        model = EnclaveModel(load_enclave_part(w.source), RemoteOps(caller, w.cfg, torch.float32), "daemon", calls,
                             score_step=step)
        # a sequence, then shorter ones from pos 0 in the same session: the K/V store's rows past them must be zero
        # again, and graphs holding buffers the store let go are dropped (the third starts with one position)
        # (the first is long enough for the K/V buffers to grow under graphs that hold them)
        for n, new, seed in ((20, 30, 2), (3, 12, 4), (1, 12, 6)):
            ids = random_ids(n, 320, seed=seed)
            with torch.no_grad():
                ref = hf.generate(ids, max_new_tokens=new, do_sample=False)[0, n:].tolist()
            before, planned = RerunCapture.replays, sum(served)
            assert generate(model, ids, new, Sampler()).tokens == ref, (calls, step, n)
            # every decode step's calls of every layer replayed (none fell back to eager but the first, captured)
            layers = w.cfg.num_hidden_layers
            # fewest padded: AttentionScores and AttentionOutput whole, gate|up, down; unpadded: AttentionScores'
            # projections and RoPE, gate|up, down; v2.4: its four BatchLinears (its products run eagerly)
            per_step = {("fewest", 8): 4, ("fewest", 1): 3, ("v2.4", 8): 4}[calls, step]
            assert RerunCapture.replays - before >= per_step * layers * (new - 2), (calls, step, n)
            # and most of them by their plans: all but V's rows kept eagerly (v2.4's q|k|v) and the unpadded scores
            # (the first steps at each pair of lap starts, and after each new width, take the checks)
            by_plans = {("fewest", 8): 4, ("fewest", 1): 2, ("v2.4", 8): 3}[calls, step]
            assert sum(served) - planned >= by_plans * layers * (new - 5), (calls, step, n)
        assert graphs.on and 0 < len(graphs.graphs)
        # a decode step's Embedding and LMHead are graphs too, served by plans (their records repeat every step)
        assert {"Embedding", "LMHead"} <= {key[0] for key in graphs.graphs}
        assert {"Embedding", "LMHead"} <= {record[0] for record in graphs.plans}
        for layer, families in graphs.families.items():   # one graph per family, each holding the store's buffers
            kv = caller.session.kv
            for family, (key, held) in families.items():
                assert key in graphs.graphs
                assert held <= {b.data_ptr() for b in (kv.buffers["k"][layer], kv.buffers["v"][layer])}


def test_a_graph_holding_a_kv_buffer_the_store_let_go_is_dropped():
    """A client can make one graph family per lap start (and dtype) of a layer: when the store moves V to a larger
    buffer, every graph still holding the old one goes, not only the family the call came in (the quota)."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    cfg = c.cfg
    W = 8
    ps = [torch.rand(1, cfg.num_key_value_heads, cfg.groups, W) for _ in range(2)]   # P at either lap start
    out = torch.empty(1, 1, cfg.hidden_size)
    graphs = SessionGraphs(c, None, [p.data_ptr() for p in ps], [out.data_ptr()], log=print, capture=RerunCapture)
    graphs.width_step = W
    old_v, new_v = (torch.rand(1, cfg.num_key_value_heads, rows, cfg.head_dim) for rows in (16, 32))
    for p in ps:
        assert graphs.output(0, p, old_v[:, :, :W], out)
    assert len(graphs.graphs) == 2
    assert graphs.output(0, ps[0], new_v[:, :, :W], out)   # the store grew V's buffer
    assert len(graphs.graphs) == 1 and not any(old_v.data_ptr() in held for families in graphs.families.values()
                                               for _, held in families.values())
    torch.testing.assert_close(out, c.output_product(0, ps[0], new_v[:, :, :W]))


# ---- plans: a repeated decode call's checks, graph and reply layout found by its request's record

def _session(c, step: int = 8, wire: torch.dtype = torch.float32, mode: str = "plans"):
    """An in-process session on `c` -> (caller, its graphs or None): "plans" (graphs with the stand-in capture, padded
    scores at `step`, plans), "graphs" (no plans) or "eager" (no graphs: the routes' eager path)."""
    handler = ModelHandler(c, "test", "", log=lambda m: None)
    caller = InProcessCaller(handler, wire, 256 << 10)
    graphs = None
    if mode != "eager":
        graphs = caller.session.graphs = SessionGraphs(c, None, caller.req.native.message_starts,
                                                       caller.rsp.native.message_starts, log=print,
                                                       capture=RerunCapture)
        graphs.width_step = step
        if mode == "graphs":
            graphs.remember = lambda *a: None
    return caller, graphs


def _scores(caller, c, pos, width, seed):
    """AttentionScores of one random row at `pos` padded to `width`: the reply's values (an owned copy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, c.cfg.hidden_size, generator=g)
    tables = torch.randn(4, 1, c.cfg.head_dim, generator=g)
    with caller.call("AttentionScores", [x, tables], layer=0, op=width, pos=pos) as r:
        return r.take(0)


def _counting(monkeypatch):
    """Count the calls served by a plan."""
    served = []
    inner = SessionGraphs.replay_planned

    def replay_planned(self, request, builder, kv):
        ran = inner(self, request, builder, kv)
        served.append(ran)
        return ran
    monkeypatch.setattr(SessionGraphs, "replay_planned", replay_planned)
    return served


def _without_then_with_plans(monkeypatch, c, step):
    """(planned, caller, graphs, served): a session whose calls are never remembered as plans, then one with plans
    (`served`: which calls a plan served, `_counting`). Each caller is the loop body's to close."""
    yield (False, *_session(c, step, mode="graphs"), [])
    yield (True, *_session(c, step), _counting(monkeypatch))


def test_planned_calls_give_the_eager_routes_values_and_refuse_what_they_refuse(monkeypatch):
    """Steps served by plans write the same bytes as the same steps through the checks and routes; a repeated
    record whose position the store does not hold is refused as the checks refuse it (the plan does not apply),
    and a restart at pos 0 runs through the checks."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    W = 8
    results = {}
    for planned, caller, graphs, served in _without_then_with_plans(monkeypatch, c, W):
        with caller:
            results[planned] = [_scores(caller, c, pos, W, seed=pos) for pos in range(6)]
            if planned:
                assert sum(served) >= 4 and graphs.plans   # pos 0 and the first call at each lap start: the checks
                with pytest.raises(ProtocolError, match="holds 6 positions, request says pos 4"):
                    _scores(caller, c, 4, W, seed=9)
                results["restart"] = _scores(caller, c, 0, W, seed=0)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    assert torch.equal(results["restart"], results[True][0])


def _embed_and_head(caller, c, token: int, seed: int):
    """A decode step's Embedding of `token` and an LMHead of one random row: both replies' values (owned copies)."""
    with caller.call("Embedding", [torch.tensor([[token]])]) as r:
        row = r.take(0)
    x = torch.randn(1, 1, c.cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    with caller.call("LMHead", [x]) as r:
        return row, r.take(0)


def test_embedding_and_lm_head_plans_give_the_eager_values_and_refuse_an_id_out_of_range(monkeypatch):
    """A decode step's Embedding and LMHead served by plans write what the eager routes write; the id a plan looks up
    is the one it read and checked (the graph reads a pinned word, not the ring the client may rewrite), and an id
    out of range is refused as the checks refuse it, with the ring as without plans (the refusal reserved nothing)."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    V = c.cfg.vocab_size
    tokens = [3, 17, V - 1, 0, 42, 9, 250, 1]
    results, heads = {}, {}
    for planned, caller, graphs, served in _without_then_with_plans(monkeypatch, c, 8):
        with caller:
            results[planned] = [_embed_and_head(caller, c, t, seed=i) for i, t in enumerate(tokens[:5])]
            with pytest.raises(ShmrtError, match=f"token id out of range \\[0, {V}\\): {V}"):
                _embed_and_head(caller, c, V, seed=0)
            results[planned] += [_embed_and_head(caller, c, t, seed=i) for i, t in enumerate(tokens[5:])]
            heads[planned] = (caller.req.producer.head, caller.rsp.producer.head)
            if planned:
                assert sum(served) >= 8 and {r[0] for r in graphs.plans} == {"Embedding", "LMHead"}
    for (row_a, logits_a), (row_b, logits_b), t in zip(results[False], results[True], tokens):
        assert torch.equal(row_a, row_b) and torch.equal(row_b.view(-1), c.w.embed[t])
        assert torch.equal(logits_a, logits_b)
    assert heads[False] == heads[True]


def _random_embedding_or_lm_head(rng: random.Random, c) -> tuple[str, torch.Tensor]:
    """A request of either call, valid (most) or not: ids of both int dtypes, out of range, negative, past int32, of
    a float dtype, of other shapes, batches and lengths, empty; LMHead rows of other dtypes, shapes and batches."""
    V, D = c.cfg.vocab_size, c.cfg.hidden_size
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype, tok = rng.choice([torch.int64, torch.int64, torch.int32]), rng.randrange(V)
    if rng.random() < 0.5:
        ids = rng.choice([[[tok]]] * 8 + [[[V + rng.randrange(3)]], [[-1]], [[2 ** 31 - 1]], [tok], [[[tok]]],
                                          [[tok], [1]], [[1, tok, 2]], [[1, V, 2]]])
        kind = rng.randrange(12)
        t = torch.tensor(ids, dtype=dtype) if kind else torch.tensor(ids, dtype=torch.float32)
        return "Embedding", (t if kind != 1 else torch.zeros(0, 1, dtype=dtype))
    shape = rng.choice([(1, 1, D)] * 6 + [(1, D), (2, 1, D), (2, D), (1, 2, D), (1, 1, D + 1), (1, 1, 1, D), (0, 1, D)])
    x = torch.randn(shape, generator=g)
    return "LMHead", rng.choice([x] * 6 + [x.to(torch.bfloat16), x.to(torch.float16), (x * 3).to(torch.int64)])


def _call_after(caller, method: str, t: torch.Tensor, pad: int):
    """`method` of `t`, staged after `pad` bytes staged and never sent (off the request ring's lap starts if pad)."""
    if not pad:
        return caller.call(method, [t])
    req = caller.request()
    req.alloc((pad // 4,), torch.float32)
    return caller.call(method, [req.alloc(tuple(t.shape), t.dtype).copy_(t)])


@pytest.mark.parametrize("seed,wire", [(0, torch.float32), (1, torch.bfloat16)])
def test_embedding_and_lm_head_answer_with_graphs_and_plans_as_without(seed, wire):
    """The same random requests through sessions with graphs and plans, graphs alone and no graphs (the eager path):
    the same reply bytes at the same places or the same refusal, both rings' producers at the same heads after each
    call; requests off the lap starts, replies held so the next lands elsewhere. A reservation made before a refusal,
    a check skipped, a record's other plan with the last call's id: each fails here."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    modes = ("plans", "graphs", "eager")
    sessions = [_session(c, wire=wire, mode=mode) for mode in modes]
    served = []
    first = sessions[0][1]
    inner = first.replay_planned
    first.replay_planned = lambda *a: served.append(inner(*a)) or served[-1]
    rng = random.Random(seed)
    held = [None] * 3
    try:
        for step in range(300):
            method, t = _random_embedding_or_lm_head(rng, c)
            pad, hold = rng.choice([0] * 5 + [64, 1024]), rng.random() < 0.15
            outcomes = []
            for i, (caller, _) in enumerate(sessions):
                try:
                    reply = _call_after(caller, method, t, pad)
                except ShmrtError as exc:
                    outcome = ("refused", str(exc))
                else:
                    outcome = ("ok", [(r.view(torch.uint8).clone(), r.data_ptr() - caller.rsp.native.address)
                                      if r.numel() else (r.clone(), None) for r in reply.views()])
                    if held[i] is not None:
                        held[i].release()
                    held[i] = reply if hold else reply.release()
                outcomes.append((*outcome, caller.req.producer.head, caller.rsp.producer.head))
            for mode, got in zip(modes, outcomes):
                ok = got[0] == outcomes[2][0] and got[2:] == outcomes[2][2:] and (
                    got[1] == outcomes[2][1] if got[0] == "refused" else len(got[1]) == len(outcomes[2][1]) and
                    all(torch.equal(a, b) and pa == pb for (a, pa), (b, pb) in zip(got[1], outcomes[2][1])))
                assert ok, (step, mode, method, tuple(t.shape), t.dtype, pad, got[0], outcomes[2][0])
        assert sum(served) >= 30 and {record[0] for record in first.plans} == {"Embedding", "LMHead"}
    finally:
        for reply, (caller, _) in zip(held, sessions):
            if reply is not None:
                reply.release()
            caller.close()


class RewritingReplay(RerunCapture):
    """A replay that first writes `value` over the int64 word at each of the request ring's lap starts (where a
    decode step's id lies): a client changing its id after the daemon checked it, before the device reads anything."""

    ring = None
    value = 0

    def replay(self):
        for start in self.ring.lap_starts:
            struct.pack_into("<q", self.ring.data, start, self.value)
        return super().replay()


@pytest.mark.parametrize("rewrite", [7, 600])   # (tiny's vocabulary: 512)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_graphed_embedding_looks_up_the_id_it_checked_not_the_ring(rewrite, dtype):
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    caller, graphs = _session(c)
    graphs.capture = RewritingReplay
    RewritingReplay.ring, RewritingReplay.value = caller.req, rewrite
    with caller:
        for token in range(100, 106):
            before = RerunCapture.replays
            with caller.call("Embedding", [torch.tensor([[token]], dtype=dtype)]) as r:
                assert RerunCapture.replays > before and torch.equal(r.view(0).view(-1), c.w.embed[token])


def test_a_planned_embedding_reads_its_id_from_the_ring_once(monkeypatch):
    """Also where the record has two plans (its reply at either lap start: one held reply pairs them the other way):
    the other plan takes the id the first read and checked."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    reads = []
    inner = LinearCompute.decode_token
    monkeypatch.setattr(LinearCompute, "decode_token", lambda self, ids: reads.append(1) or inner(self, ids))
    caller, graphs = _session(c)
    with caller:
        def embed(token):
            return caller.call("Embedding", [torch.tensor([[token]])])
        for token in range(4):
            embed(token).release()
        with embed(4):
            embed(5).release()
        for token in range(6, 12):
            embed(token).release()
        assert any(len(plans) == 2 for plans in graphs.plans.values())
        per_call = []
        for token in range(20, 26):
            reads.clear()
            with embed(token) as r:
                assert torch.equal(r.view(0).view(-1), c.w.embed[token])
            per_call.append(len(reads))
    assert per_call == [1] * 6


def test_embedding_and_lm_head_take_graphs_only_for_one_row_at_lap_starts():
    """A graph per shape or address a client sends would hold device memory for each, up to MAX_GRAPHS: LMHead of
    more than one row, and either call off its rings' lap starts, run eagerly."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    D = c.cfg.hidden_size
    caller, graphs = _session(c)
    with caller:
        caller.call("Embedding", [torch.tensor([[3]])]).release()
        caller.call("LMHead", [torch.randn(1, 1, D)]).release()
        assert sorted(key[0] for key in graphs.graphs) == ["Embedding", "LMHead"]
        for B in (2, 3):
            caller.call("LMHead", [torch.randn(B, 1, D)]).release()
            caller.call("LMHead", [torch.randn(B, D)]).release()
        for pad in (64, 1024):
            _call_after(caller, "Embedding", torch.tensor([[5]]), pad).release()
            _call_after(caller, "LMHead", torch.randn(1, 1, D), pad).release()
        for method, t in (("Embedding", torch.tensor([[6]])), ("LMHead", torch.randn(1, 1, D))):
            with caller.call(method, [t]):   # held: the next reply lands after it
                caller.call(method, [t]).release()
        for key in graphs.graphs:
            if key[0] == "LMHead":
                assert key[3][0] == 1 and key[1] in graphs.request_starts and key[4] in graphs.reply_starts, key
            elif key[0] == "Embedding":
                assert key[1] in graphs.request_starts and key[3] in graphs.reply_starts, key


def _steps_holding_one_reply(caller, c, W):
    """AttentionScores at pos 0..9, step 6 made while step 5's reply is still held: the values of each step."""
    out = [_scores(caller, c, pos, W, seed=pos) for pos in range(5)]
    g = torch.Generator().manual_seed(5)
    x, tables = torch.randn(1, 1, c.cfg.hidden_size, generator=g), torch.randn(4, 1, c.cfg.head_dim, generator=g)
    with caller.call("AttentionScores", [x, tables], layer=0, op=W, pos=5) as held:
        out.append(held.take(0))
        head = caller.rsp.producer.head
        out.append(_scores(caller, c, 6, W, seed=6))
        assert caller.rsp.producer.head > head   # step 6's reply went after the held one
    return out + [_scores(caller, c, pos, W, seed=pos) for pos in range(7, 10)]


def test_a_reply_landing_elsewhere_takes_the_checks_and_leaves_the_ring_as_it_was(monkeypatch):
    """A client holding the last reply moves the next one off the lap starts: the plan's reservation is taken back
    (the producer rewound), the call runs through the checks and eagerly into its reply's real place, and the calls
    after it are served by plans again; every value as without plans."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    W = 16
    results = {}
    for planned, caller, graphs, served in _without_then_with_plans(monkeypatch, c, W):
        with caller:
            results[planned] = _steps_holding_one_reply(caller, c, W)
    expected, got = results[False], results[True]
    # pos 0 and the first calls at each lap start take the checks, and so does step 6; the request and reply lap
    # starts may pair up the other way after it (a new plan each), then plans serve again
    assert served[4:7] == [True, True, False] and served[-1]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_a_producer_rewound_takes_back_its_reservations():
    """Producer.mark/rewind (the plans' reservation where the reply lands elsewhere): the state as it was, the
    next reservation where the rewound one was, nothing published; a detached producer stays detached."""
    from shmrt.wire.ring import OFF_HEAD, Ring
    ring = Ring.create(1 << 16, "rsp")
    try:
        p = ring.producer
        p.reserve(100, timeout=0)
        p.publish()
        p.mark()
        state = bytes(ffi_buffer(p))
        first = p.reserve(300, timeout=0)
        p.reserve(5000, timeout=0)
        p.rewind()
        assert bytes(ffi_buffer(p)) == state and ring.native.load(OFF_HEAD) == p.published
        assert p.reserve(300, timeout=0) == first
        assert not p.mark()   # in the middle of a message: nothing to come back to
        p.publish()
        with pytest.raises(AssertionError):   # never back across a publish (nor without a mark)
            p.rewind()
        assert p.mark()
        p.reserve(64, timeout=0)
        p.publish()
        with pytest.raises(AssertionError):
            p.rewind()
        assert p.mark()
        p.detach()
        p.rewind()
        with pytest.raises(ShmrtError):
            p.reserve(8, timeout=0)
    finally:
        ring.close()


def ffi_buffer(producer):
    from shmrt.wire.native import ffi
    return ffi.buffer(producer._native.c)


# ---- what a plan must not serve: each condition of `ready` and `remember`, with a request the checks refuse or a
# store the graph no longer writes (a client's requests are its own to choose)

def _kv_call(caller, c, method, cache, pos, rows, width, seed, batch=1):
    """A Matmul (or AttentionOutput) on the daemon's `cache` at `pos`: for a Matmul, `rows` new rows of it travel;
    for an AttentionOutput, P `width` wide, the cache's rows as they are."""
    from shmrt.model.calls import matmul_bits
    cfg = c.cfg
    g = torch.Generator().manual_seed(seed)
    if method == "Matmul":
        a = torch.randn(batch, cfg.num_key_value_heads, cfg.groups, cfg.head_dim, generator=g)
        b = torch.randn(batch, cfg.num_key_value_heads, rows, cfg.head_dim, generator=g)
        if cache == "v":
            a = torch.randn(batch, cfg.num_key_value_heads, cfg.groups, pos + rows, generator=g)
        tensors, op = [a, b], matmul_bits(cache == "k", cache)
    else:
        tensors, op = [torch.rand(batch, cfg.num_key_value_heads, cfg.groups, width, generator=g)], matmul_bits(False, cache)
    with caller.call(method, tensors, layer=0, op=op, pos=pos) as r:
        return r.take(0)


def test_a_plan_does_not_serve_scores_once_k_restarted_behind_v():
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    caller, _ = _session(c, 8)
    with caller:
        for pos in range(6):
            _scores(caller, c, pos, 8, seed=pos)
        _kv_call(caller, c, "Matmul", "k", 0, 2, 0, seed=10)   # K restarts with 2 rows; V keeps 6
        with pytest.raises(ProtocolError, match="K cache of layer 0 holds 2 positions, request says pos 6"):
            _scores(caller, c, 6, 8, seed=6)


def test_a_plan_does_not_serve_scores_past_its_width():
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    caller, _ = _session(c, 8)
    with caller:
        _scores(caller, c, 0, 16, seed=0)   # buffers with room for 16 rows: a write at 8 would land in them
        for pos in range(8):
            _scores(caller, c, pos, 8, seed=pos)
        with pytest.raises(ProtocolError, match="width 8: expected 0 or from pos"):
            _scores(caller, c, 8, 8, seed=8)


def test_a_plan_does_not_write_k_and_v_buffers_the_store_let_go(monkeypatch):
    """K moved to new buffers by calls of another shape (a batch of 2, then 1 again, as many rows as V): the store
    holds as many rows as the plan expects, in other memory. The next step's scores are those of a session without
    plans."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)

    def steps(caller):
        out = [_scores(caller, c, pos, 8, seed=pos) for pos in range(4)]
        _kv_call(caller, c, "Matmul", "k", 0, 3, 0, seed=11, batch=2)
        out.append(_kv_call(caller, c, "Matmul", "k", 0, 4, 0, seed=12))
        return out + [_scores(caller, c, pos, 8, seed=pos) for pos in (4, 5)]
    results = {}
    for planned, caller, _, served in _without_then_with_plans(monkeypatch, c, 8):
        with caller:
            results[planned] = steps(caller)
    expected, got = results[False], results[True]
    assert any(served)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cache", ["v", "k"])
def test_a_plan_does_not_serve_attention_output_once_its_cache_grew_past_p(cache):
    """AttentionOutput multiplies P by the cache its op names (V, or K if the client asks): once that cache holds
    more rows than P is wide, the checks refuse it, and so must a plan made before."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    caller, graphs = _session(c, 8)
    with caller:
        _scores(caller, c, 0, 8, seed=0)
        for i in range(4):
            _kv_call(caller, c, "AttentionOutput", cache, 0, 0, 8, seed=20 + i)
        assert any(key[0] == "AttentionOutput" for key in graphs.plans)
        _kv_call(caller, c, "Matmul", cache, 1, 10, 0, seed=30)   # that cache: 11 rows
        with pytest.raises(ProtocolError, match="inner dims differ"):
            _kv_call(caller, c, "AttentionOutput", cache, 0, 0, 8, seed=24)


def test_plans_are_made_only_for_replies_of_one_reservation():
    """With a 16-bit wire, tiny's gate and up replies (176 elements: 352 bytes) do not end on a descriptor boundary:
    two reservations, so no plan (the graph writes the second where the first reservation does not reach). Every
    plan's reply lies inside its one reservation, and decoding gives the same tokens as without graphs."""
    w = load_weights("tiny")
    tokens = {}
    for with_graphs in (False, True):
        handler = ModelHandler(LinearCompute(w, "cpu", torch.float32), "test", "", log=print)
        with InProcessCaller(handler, torch.bfloat16, 256 << 10) as caller:
            if with_graphs:
                graphs = caller.session.graphs = SessionGraphs(handler.c, None, caller.req.native.message_starts,
                                                               caller.rsp.native.message_starts, log=print,
                                                               capture=RerunCapture)
                graphs.width_step = 8
            model = EnclaveModel(load_enclave_part(w.source), RemoteOps(caller, w.cfg, torch.bfloat16), "daemon",
                                 "fewest", score_step=8)
            tokens[with_graphs] = generate(model, random_ids(5, 320, seed=3), 12, Sampler()).tokens
            if with_graphs:
                assert graphs.plans
                for (method, *_), plans in graphs.plans.items():
                    for plan in plans:
                        for d in plan.reply_descs:
                            assert plan.reply_offset <= d.offset and d.offset + d.nbytes <= \
                                plan.reply_offset + plan.reply_nbytes, (method, plan.reply_descs)
    assert tokens[True] == tokens[False]


def _random_call(rng: random.Random, c, filled: int):
    """One decode-shaped call a client might make, valid or not: (method, tensors, layer, op, pos)."""
    from shmrt.model.calls import matmul_bits, projection_bits
    cfg = c.cfg
    Hkv, g, hd = cfg.num_key_value_heads, cfg.groups, cfg.head_dim
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    kind = rng.choice(["scores"] * 4 + ["output"] * 3 + ["matmul"] * 2 + ["gate_up", "down"])
    pos = rng.choice([filled] * 6 + [0, max(filled - 1, 0), filled + 1])
    layer = rng.choice([0, 0, 0, 1])
    if kind == "scores":
        tensors = [torch.randn(1, 1, cfg.hidden_size, generator=gen), torch.randn(4, 1, hd, generator=gen)]
        return "AttentionScores", tensors, layer, rng.choice([8, 8, 16, 0]), pos
    if kind == "output":
        p = torch.rand(1, Hkv, g, rng.choice([8, 8, 16]), generator=gen)
        return "AttentionOutput", [p], layer, matmul_bits(False, rng.choice(["v", "k"])), pos
    if kind == "matmul":
        cache, rows = rng.choice(["k", "v"]), rng.randint(1, 3)
        a = torch.randn(1, Hkv, g, hd if cache == "k" else pos + rows, generator=gen)
        return "Matmul", [a, torch.randn(1, Hkv, rows, hd, generator=gen)], layer, matmul_bits(cache == "k", cache), pos
    if kind == "gate_up":
        return "BatchLinear", [torch.randn(1, 1, cfg.hidden_size, generator=gen)], layer, \
            projection_bits(["gate_proj", "up_proj"]), 0
    return "BatchLinear", [torch.randn(1, 1, cfg.intermediate_size, generator=gen)], layer, \
        projection_bits(["down_proj"]), 0


@pytest.mark.parametrize("seed", range(4))
def test_plans_change_no_outcome_of_random_call_sequences(seed):
    """Differential: the same random sequence of decode-shaped calls (steps at the right position and off it, scores
    of two widths, outputs naming V or K, K/V rows that restart or grow a cache, the MLP's projections, replies held
    across a call) through a session whose graphs remember plans and one whose graphs do not: every reply the same
    bytes at the same places, every refusal the same message, and plans served a good part of them."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    sessions = []
    for planned in (True, False):
        caller, graphs = _session(c, 8)
        if not planned:
            graphs.remember = lambda *a: None
        sessions.append((caller, graphs))
    served = []
    planned_graphs = sessions[0][1]
    replay_planned = planned_graphs.replay_planned
    planned_graphs.replay_planned = lambda *a: served.append(replay_planned(*a)) or served[-1]
    try:
        rng = random.Random(seed)
        filled = 0
        for step in range(300):
            method, tensors, layer, op, pos = _random_call(rng, c, filled)
            hold = rng.random() < 0.1
            outcomes = []
            for caller, graphs in sessions:
                try:
                    reply = caller.call(method, tensors, layer=layer, op=op, pos=pos)
                except ShmrtError as exc:
                    outcomes.append(("refused", str(exc)))
                    continue
                with reply:   # the values, and where they lay in the response ring
                    values = [reply.view(i).clone() for i in range(len(reply))]
                    places = [reply.view(i).data_ptr() - caller.rsp.native.address for i in range(len(reply))]
                    if hold:   # the next call's reply lands elsewhere while this one is held
                        extra = caller.call("BatchLinear", [tensors[0] if method == "BatchLinear" and op != 64 else
                                                            torch.zeros(1, 1, c.cfg.hidden_size)],
                                            layer=0, op=op if method == "BatchLinear" and op != 64 else 48)
                        extra.release()
                outcomes.append(("ok", values, places))
            (a, b) = outcomes
            assert a[0] == b[0], (step, method, a, b)
            if a[0] == "refused":
                assert a[1] == b[1], (step, method)
            else:
                assert all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2], (step, method, op, pos)
                if method == "AttentionScores" and layer == 0:
                    filled = pos + 1
        assert sessions[0][1].plans and not sessions[1][1].plans
        assert sum(served) >= 20
    finally:
        for caller, _ in sessions:
            caller.close()
