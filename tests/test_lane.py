"""host/lane.py: a daemon's planned calls served in C, from the take to the reply's post. Real daemon processes
(a Server with the model's handler on the CPU, its plans' bodies run again where a CUDA daemon would launch a graph)
and real clients over shared memory; values against transformers and against the same daemon serving every call
from Python (SHMRT_PLANNED_LANE=0)."""
import multiprocessing
import os
import queue
import random
import re

import pytest
import torch

from conftest import random_ids
from test_graph_routes import _kv_call, _scores
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import Sampler, generate
from shmrt.errors import PeerError
from shmrt.host.compute import LinearCompute
from shmrt.host.weights import load_weights
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport

SERVED = re.compile(r"\((\d+) planned calls served in C[,)]")


def _serve(model: str, endpoint: str, logs, stop, *, width_step: int, lane: bool, device: str) -> None:
    """A daemon: the model's handler (on a CPU with plans), the lane on or off, scores padded to `width_step`."""
    os.environ["SHMRT_PLANNED_LANE"] = "1" if lane else "0"
    os.environ["SHMRT_POISON"] = "1"   # released ring memory reads 0xFF (NaN): a view kept past its release shows
    import shmrt.host.graphs as graphs
    graphs.SCORE_WIDTH_STEP = width_step   # (read as each session's graphs are made)
    from shmrt.host.daemon import ModelHandler
    from shmrt.host.server import Server
    from shmrt.model.checkpoint import model_digest, resolve_model
    source = resolve_model(model)
    weights = load_weights(source, device=device)
    handler = ModelHandler(LinearCompute(weights, device, torch.float32), model, model_digest(source), log=logs.put,
                           cpu_plans=True)
    with Server(endpoint, handler, log=logs.put) as server:
        logs.put("ready")
        server.serve(until=stop.is_set, poll_ms=20)


class Daemon:
    def __init__(self, model: str, endpoint: str, *, width_step: int = 256, lane: bool = True, device: str = "cpu"):
        self._start(endpoint, _serve, model, endpoint, width_step=width_step, lane=lane, device=device)

    def _start(self, endpoint: str, target, *args, **kwargs) -> None:
        """`target(*args, logs, stop, **kwargs)` in a process of its own, once it says "ready"."""
        ctx = multiprocessing.get_context("spawn")
        self.endpoint = endpoint
        self.logs, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=target, args=(*args, self.logs, self.stop), kwargs=kwargs, daemon=True)
        self.proc.start()
        self.lines = []
        assert self._until(lambda line: line == "ready", 120), self.lines

    def _until(self, found, timeout: float) -> bool:
        while True:
            try:
                line = self.logs.get(timeout=timeout)
            except queue.Empty:
                return False
            self.lines.append(line)
            if found(line):
                return True

    def served(self, sessions: int = 1) -> list[int]:
        """Planned calls served in C by each session that closed (its log line), once `sessions` have."""
        closed = lambda: sum("closed" in line for line in self.lines)   # noqa: E731
        while closed() < sessions and self._until(lambda line: "closed" in line, 10):
            pass
        return [int(m[1]) for m in map(SERVED.search, self.lines) if m]

    def served_by(self, clients) -> list[int | None]:
        """Planned calls served in C in each of these clients' sessions (None: no lane), once each has closed."""
        ids = [f"session {t._routing_id.hex()[:8]} " for t in clients]
        closing = lambda: [next((line for line in self.lines if i in line), None) for i in ids]   # noqa: E731
        while None in closing() and self._until(lambda line: "closed" in line, 10):
            pass
        return [int(m[1]) if m else None for m in (SERVED.search(line or "") for line in closing())]

    def close(self) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kv_cache", ["daemon", "client"])
def test_the_lane_serves_decode_steps_with_transformers_tokens_through_small_poisoned_rings(checkpoints, tmp_path,
                                                                                           monkeypatch, kv_cache,
                                                                                           device):
    """Three sequences in one session (the second and third restart at pos 0: the K/V store's counts go back, and
    an entry whose count no longer matches is the Python path's), rings of 64 KiB (messages wrap), released memory
    poisoned (a reply or a request read after its release is NaN): tokens as transformers', and most decode calls
    served in C (on a GPU, each a CUDA graph launched by the CUDA runtime, from C)."""
    monkeypatch.setenv("SHMRT_POISON", "1")
    path, hf = checkpoints["gqa-tied-llama3"]
    daemon = Daemon(str(path), f"ipc://{tmp_path}/d.sock", device=device)
    try:
        with EnclaveClient(endpoint=daemon.endpoint, model=str(path), kv_cache=kv_cache, ring_mib=1 / 16,
                           total_tokens=64) as client:
            steps = 0
            for n, new, seed in ((20, 30, 2), (3, 12, 4), (1, 12, 6)):
                ids = random_ids(n, 320, seed=seed)
                with torch.no_grad():
                    ref = hf.generate(ids, max_new_tokens=new, do_sample=False)[0, n:].tolist()
                assert generate(client.model, ids, new, Sampler()).tokens == ref, (kv_cache, n)
                steps += new - 1
        (served,) = daemon.served()
        layers = client.cfg.num_hidden_layers
        # per decode step: Embedding, LMHead and per layer gate|up and down (and, K/V on the daemon, the padded
        # scores and P*V); every step but a sequence's first few (captures; the store's buffers growing under them)
        per_step = 2 + (4 if kv_cache == "daemon" else 2) * layers
        assert served >= per_step * (steps - 12), (served, per_step, steps)
        assert (device == "cuda") == any("graphs launched from C" in line for line in daemon.lines), daemon.lines
    finally:
        daemon.close()


def _random_call(rng: random.Random, cfg, filled: list[int]):
    """One decode-shaped call a client might make to layer 0 or 1 (`filled`: their K/V rows as the client counts
    them), now and then one the daemon refuses (a position off by one, a width short of it, P wider than the cache's
    room, P over an empty cache, an id out of the vocabulary): (method, tensors, layer, op, pos)."""
    from shmrt.model.calls import matmul_bits, projection_bits
    Hkv, g, hd = cfg.num_key_value_heads, cfg.groups, cfg.head_dim
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    layer = rng.choice([0, 0, 1])
    kind = rng.choice(["scores"] * 4 + ["output"] * 3 + ["matmul", "gate_up", "down", "restart", "embed", "head"])
    pos = filled[layer] if rng.random() > 0.03 else filled[layer] + rng.choice([-1, 1])
    padded = -(-(pos + 1) // 8) * 8   # the width a step at pos pads to (SCORE_WIDTH_STEP 8 in these daemons)
    if kind == "output" and (filled[layer] or rng.random() < 0.05):
        width = -(-max(filled[layer], 1) // 8) * 8 if rng.random() > 0.05 else 16 + 8 * rng.randint(0, 2)
        p = torch.rand(1, Hkv, g, width, generator=gen)
        return "AttentionOutput", [p], layer, matmul_bits(False, rng.choice(["v", "v", "v", "k"])), 0
    if kind in ("scores", "restart", "output"):
        tensors = [torch.randn(1, 1, cfg.hidden_size, generator=gen), torch.randn(4, 1, hd, generator=gen)]
        if kind == "restart":
            return "AttentionScores", tensors, layer, 8, 0
        short = padded - 8 if padded > 8 else 0   # past its width (the plan of that width must not serve it)
        return "AttentionScores", tensors, layer, rng.choice([padded] * 12 + [padded + 8, 0, short]), max(pos, 0)
    if kind == "matmul":
        cache, rows = rng.choice(["k", "v"]), rng.randint(1, 2)
        a = torch.randn(1, Hkv, g, hd if cache == "k" else max(pos, 0) + rows, generator=gen)
        return "Matmul", [a, torch.randn(1, Hkv, rows, hd, generator=gen)], layer, matmul_bits(cache == "k", cache), \
            max(pos, 0)
    if kind == "embed":
        token = rng.randrange(cfg.vocab_size) if rng.random() > 0.03 else rng.choice([-1, cfg.vocab_size])
        return "Embedding", [torch.tensor([[token]], dtype=rng.choice([torch.int64, torch.int64, torch.int32]))], -1, 0, 0
    if kind == "head":
        return "LMHead", [torch.randn(1, 1, cfg.hidden_size, generator=gen)], -1, 0, 0
    if kind == "gate_up":
        return "BatchLinear", [torch.randn(1, 1, cfg.hidden_size, generator=gen)], layer, \
            projection_bits(["gate_proj", "up_proj"]), 0
    return "BatchLinear", [torch.randn(1, 1, cfg.intermediate_size, generator=gen)], layer, \
        projection_bits(["down_proj"]), 0


@pytest.fixture(scope="module")
def step8(tmp_path_factory):
    """The tiny preset's daemons with scores padded to 8 (so that short sequences have plans): (lane, python)."""
    directory = tmp_path_factory.mktemp("lane")
    daemons = [Daemon("tiny", f"ipc://{directory}/{name}.sock", width_step=8, lane=lane)
               for name, lane in (("lane", True), ("python", False))]
    yield daemons
    for d in daemons:
        d.close()


def _open(endpoint: str, doorbell: str = "shm", calls_in_c: bool = True, ring_bytes: int = 1 << 20):
    t = client_transport("shm", endpoint, timeout=30, doorbell=doorbell)
    t.hello(client_info())
    t.open_session(ring_bytes)
    t.calls_in_c = calls_in_c
    t.call("Init").release()
    return t


class Sessions:
    """One session on each daemon of a list (reopened together), rung through `doorbell`; the first daemon's client
    makes its calls in C (shmrt_call), the others' from Python; `served()`: per daemon, what its lane served in each
    of them (None: no lane), from its log."""

    def __init__(self, daemons, doorbell: str = "shm", ring_bytes: int = 1 << 20):
        self.daemons, self.doorbell, self.ring_bytes = daemons, doorbell, ring_bytes
        self.opened = [[] for _ in daemons]
        self.clients = []
        self.reopen()

    def reopen(self) -> None:
        self.close()
        self.clients = [_open(d.endpoint, self.doorbell, i == 0, self.ring_bytes) for i, d in enumerate(self.daemons)]
        for mine, t in zip(self.opened, self.clients):
            mine.append(t)

    def close(self) -> None:
        for t in self.clients:
            t.close()
        self.clients = []

    def served(self) -> list[list[int | None]]:
        return [d.served_by(mine) for d, mine in zip(self.daemons, self.opened)]


def _outcome(t, method, tensors, layer=-1, op=0, pos=0, hold=False, hidden=0):
    """("ok", values, places in the response ring, what its stats count) or ("refused", the daemon's message)."""
    try:
        reply = t.call(method, tensors, layer=layer, op=op, pos=pos)
    except PeerError as exc:
        return "refused", str(exc).split(": ", 1)[1]
    with reply:
        values = [reply.view(i).clone() for i in range(len(reply))]
        places = [reply.view(i).data_ptr() - t.rsp.native.address for i in range(len(reply))]
        s = reply.stats   # (a reply C knew makes its stats here, from the call's times)
        counts = (s.method, s.layer, s.op, s.payload_sent, s.payload_recv, s.sent_bytes, s.recv_bytes)
        if hold:   # the next reply lands elsewhere while this one is held
            t.call("BatchLinear", [torch.zeros(1, 1, hidden)], layer=0, op=48).release()
    return "ok", values, places, counts


def _same(a, b, what) -> None:
    assert a[0] == b[0], (what, a, b)
    if a[0] == "refused":
        assert a[1] == b[1], what
    else:
        assert all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2], what
        assert a[3] == b[3], (what, a[3], b[3])


@pytest.mark.parametrize("seed, doorbell", [(0, "shm"), (1, "shm"), (2, "shm"), (3, "zmq")])
def test_the_lane_changes_no_outcome_of_random_call_sequences(step8, monkeypatch, seed, doorbell):
    """Differential: the same random decode-shaped calls (steps at the right position and off it, padded widths and
    a width short of the step, P naming V or K, K/V rows that restart or grow a cache, the MLP's projections, a
    decode step's Embedding (int64 or int32, in the vocabulary or not) and LMHead, a reply held across a call) to a
    daemon whose lane serves what its plans answer, from a client whose calls are made in C, and to one that serves
    everything from Python, from a client whose calls are made from Python: every reply the same values at the same
    places in the response ring and the same byte counts in its stats, every refusal the same message (a refusal ends the session on both: each opens a
    new one), and the lane served a good part of them. Requests rung in the rings' headers, or over ZeroMQ (the
    lane checks the record that came over the socket and answers there)."""
    monkeypatch.setenv("SHMRT_POISON", "1")
    cfg = load_weights("tiny").cfg
    pair = Sessions(step8, doorbell)
    try:
        rng = random.Random(seed)
        filled = [0, 0]
        for step in range(300):
            method, tensors, layer, op, pos = _random_call(rng, cfg, filled)
            hold = rng.random() < 0.1
            a, b = (_outcome(t, method, tensors, layer, op, pos, hold, cfg.hidden_size) for t in pair.clients)
            _same(a, b, (step, method, layer, op, pos))
            if a[0] == "refused":
                pair.reopen()
                filled = [0, 0]
            elif method == "AttentionScores":   # (a guide for the next calls' positions, no more)
                filled[layer] = pos + 1
        pair.close()
        lane, python = pair.served()
        assert sum(lane) >= 40 and set(python) == {None}, lane
    finally:
        pair.close()


def _steps_on_both(step8, steps) -> list:
    """`steps(client)` on a session of each daemon (lane, python): their results, the first session's served."""
    pair = Sessions(step8)
    try:
        results = [steps(t) for t in pair.clients]
    finally:
        pair.close()
    ((served,), (none,)) = pair.served()
    assert none is None
    return results, served


def _refused(call) -> str:
    with pytest.raises(PeerError) as info:
        call()
    return str(info.value).split(": ", 1)[1]


def test_the_lane_does_not_serve_scores_once_k_restarted_behind_v(step8):
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)

    def steps(t):
        out = [_scores(t, c, pos, 8, seed=pos) for pos in range(6)]
        _kv_call(t, c, "Matmul", "k", 0, 2, 0, seed=10)   # K restarts with 2 rows; V keeps 6
        return out + [_refused(lambda: _scores(t, c, 6, 8, seed=6))]
    (lane, python), served = _steps_on_both(step8, steps)
    assert lane[-1] == python[-1] == "K cache of layer 0 holds 2 positions, request says pos 6"
    assert all(torch.equal(a, b) for a, b in zip(lane[:-1], python[:-1])) and served >= 3


def test_the_lane_does_not_serve_scores_past_its_width(step8):
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)

    def steps(t):
        _scores(t, c, 0, 16, seed=0)   # buffers with room for 16 rows: a write at 8 would land in them
        out = [_scores(t, c, pos, 8, seed=pos) for pos in range(8)]
        return out + [_refused(lambda: _scores(t, c, 8, 8, seed=8))]
    (lane, python), served = _steps_on_both(step8, steps)
    assert lane[-1] == python[-1] and "width 8: expected 0 or from pos" in lane[-1]
    assert all(torch.equal(a, b) for a, b in zip(lane[:-1], python[:-1])) and served >= 4


def test_the_lane_does_not_write_k_and_v_buffers_the_store_let_go(step8):
    """K and V moved to new buffers by calls of another shape (a batch of 2, then 1 again, as many rows as before):
    the store holds as many rows as the plan expects, in other memory (its buffers' generations moved). The next
    steps' scores are the Python path's."""
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)

    def steps(t):
        out = []
        for pos in range(4):   # plans for the scores and for P*V over V
            out += [_scores(t, c, pos, 8, seed=pos), _kv_call(t, c, "AttentionOutput", "v", 0, 0, 8, seed=pos)]
        for cache in ("k", "v"):
            _kv_call(t, c, "Matmul", cache, 0, 3, 0, seed=11, batch=2)
            out.append(_kv_call(t, c, "Matmul", cache, 0, 4, 0, seed=12))
        if output_first:   # P*V's plan, its V in another buffer (with room for 4 rows: refused)
            # (one more call first: the output's request and reply then lie at the lap starts its plan's did)
            t.call("BatchLinear", [torch.zeros(1, 1, c.cfg.hidden_size)], layer=0, op=48).release()
            return out + [_refused(lambda: _kv_call(t, c, "AttentionOutput", "v", 0, 0, 8, seed=9))]
        for pos in (4, 5, 6):
            out += [_scores(t, c, pos, 8, seed=pos), _kv_call(t, c, "AttentionOutput", "v", 0, 0, 8, seed=pos)]
        return out
    for output_first in (True, False):
        (lane, python), served = _steps_on_both(step8, steps)
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(lane, python)), output_first
        assert served >= 4 and len(lane) == len(python) == (11 if output_first else 16)


@pytest.mark.parametrize("cache", ["v", "k"])
def test_the_lane_does_not_serve_attention_output_once_its_cache_grew_past_p(step8, cache):
    c = LinearCompute(load_weights("tiny"), "cpu", torch.float32)

    def steps(t):
        _scores(t, c, 0, 8, seed=0)
        out = [_kv_call(t, c, "AttentionOutput", cache, 0, 0, 8, seed=20 + i) for i in range(4)]
        _kv_call(t, c, "Matmul", cache, 1, 10, 0, seed=30)   # that cache: 11 rows
        return out + [_refused(lambda: _kv_call(t, c, "AttentionOutput", cache, 0, 0, 8, seed=24))]
    (lane, python), served = _steps_on_both(step8, steps)
    assert lane[-1] == python[-1] and "inner dims differ" in lane[-1]
    assert all(torch.equal(a, b) for a, b in zip(lane[:-1], python[:-1])) and served >= 2


def _ring_by_hand(t, cfg, *, text: bytes = b"", ring_end: int | None = None) -> None:
    """A BatchLinear (gate|up) rung as ShmClient.call rings it, with a text or another ring end; waits for its answer."""
    from shmrt.wire import protocol
    from shmrt.wire.shm_transport import describe_input
    desc, _ = describe_input(t.req, torch.randn(1, 1, cfg.hidden_size), None, None, t.timeout)
    end = t.req.producer.publish()
    seq = t._next_seq()
    words = protocol.to_words(protocol.Method.BatchLinear, seq, 0, 48, 0, end if ring_end is None else ring_end, [desc])
    words[9] = len(text)
    t._bell_out.post_words(words, text)
    from shmrt.wire.native import now_ns
    rc = t._await_reply(seq, protocol.Method.BatchLinear, t._caller.NO_REPLIES, now_ns())
    t._taken_reply(rc, seq, protocol.Method.BatchLinear)


def test_a_planned_call_releases_its_request_poisoned_and_leaves_what_it_cannot_check_to_python(step8, monkeypatch):
    """What the lane does to the request ring: the input a served call staged there reads 0xFF (NaN) once the reply
    came (the daemon's release poisons it, SHMRT_POISON). A record the lane would serve but for its text (no planned
    call has one) or its ring end (past what the ring can hold) goes to the Python path, which refuses it as it
    always did."""
    monkeypatch.setenv("SHMRT_POISON", "1")
    cfg = load_weights("tiny").cfg
    pair = Sessions(step8[:1])
    try:
        (t,) = pair.clients
        for i in range(5):
            x = t.request().alloc((1, 1, cfg.hidden_size))
            x.copy_(torch.randn(1, 1, cfg.hidden_size))
            t.call("BatchLinear", [x], layer=0, op=48).release()
            assert torch.isnan(x).all(), i   # (a view kept past the call, to read what the release left)
        with pytest.raises(PeerError, match="doorbell text is not valid UTF-8"):
            _ring_by_hand(t, cfg, text=b"\xff\xfe")   # the same record once more, with a text
        pair.reopen()
        (t,) = pair.clients
        for _ in range(3):
            t.call("BatchLinear", [torch.randn(1, 1, cfg.hidden_size)], layer=0, op=48).release()
        with pytest.raises(PeerError, match=r"message end \d+ outside"):
            _ring_by_hand(t, cfg, ring_end=1 << 50)
    finally:
        pair.close()
    ((first, second),) = pair.served()
    assert first >= 3 and second >= 1


def test_a_planned_embedding_reads_the_id_once_and_refuses_one_out_of_the_vocabulary(step8):
    """Once a decode step's Embedding has a plan, its row is the table's row of the id sent, and an id outside the
    vocabulary (read once, in C) is still the handler's to refuse, with its message."""
    weights = load_weights("tiny")
    vocab = weights.cfg.vocab_size
    for bad in (vocab, -1, 1 << 40):
        def steps(t):
            rows = []
            for token in (5, 6, 7, 8):
                with t.call("Embedding", [torch.tensor([[token]])]) as reply:
                    rows.append(reply.view(0).clone())
            return rows + [_refused(lambda: t.call("Embedding", [torch.tensor([[bad]])]))]
        (lane, python), served = _steps_on_both(step8, steps)
        assert lane[-1] == python[-1] and "token id out of range" in lane[-1]
        for token, row in zip((5, 6, 7, 8), lane):
            assert torch.equal(row.view(-1), weights.embed[token].view(-1))
        assert served >= 2


def test_a_daemon_whose_lane_is_off_serves_the_same_tokens(checkpoints, tmp_path):
    """SHMRT_PLANNED_LANE=0 (comparison runs): every call through Python, the same tokens, no call in C."""
    path, hf = checkpoints["gqa-tied-llama3"]
    daemon = Daemon(str(path), f"ipc://{tmp_path}/d.sock", lane=False)
    try:
        ids = random_ids(9, 320, seed=11)
        with EnclaveClient(endpoint=daemon.endpoint, model=str(path), total_tokens=40) as client:
            with torch.no_grad():
                ref = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, 9:].tolist()
            assert generate(client.model, ids, 20, Sampler()).tokens == ref
        assert daemon.served() == []
    finally:
        daemon.close()


# ---- the echo daemon's lane (tests, the micro bench) and the client's calls in C

ECHOED = re.compile(r"\((\d+) echoes served in C\)")


def _serve_echo(endpoint: str, logs, stop, *, lane: bool) -> None:
    os.environ["SHMRT_PLANNED_LANE"] = "1" if lane else "0"
    os.environ["SHMRT_POISON"] = "1"
    from shmrt.host.server import EchoHandler, Server
    with Server(endpoint, EchoHandler(), log=logs.put) as server:
        logs.put("ready")
        server.serve(until=stop.is_set, poll_ms=20)


class EchoDaemon(Daemon):
    def __init__(self, endpoint: str, *, lane: bool):
        self._start(endpoint, _serve_echo, endpoint, lane=lane)

    def echoed(self, sessions: int) -> list[int]:
        closed = lambda: sum("closed" in line for line in self.lines)   # noqa: E731
        while closed() < sessions and self._until(lambda line: "closed" in line, 10):
            pass
        return [int(m[1]) for m in map(ECHOED.search, self.lines) if m]


DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.float16]


def _random_echo(rng: random.Random, shapes: list) -> tuple[str, list, bool]:
    """An echo call: 1-3 tensors, their shapes mostly one of a few seen before (so that the lane has entries for
    them), up to 16 KiB each in a 64 KiB ring (messages wrap); now and then staged in the ring (a request opened)."""
    if not shapes or rng.random() < 0.15:
        shapes.append([(rng.choice(DTYPES), rng.choice([(rng.randint(1, 2048),), (rng.randint(1, 40), rng.randint(1, 50)),
                                                        (rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 64))]))
                       for _ in range(rng.randint(1, 3))])
    tensors = []
    for dtype, shape in rng.choice(shapes):
        t = torch.randint(-1000, 1000, shape) if not dtype.is_floating_point else torch.randn(shape)
        tensors.append(t.to(dtype))
    return rng.choice(["Matmul", "BatchLinear", "LMHead"]), tensors, rng.random() < 0.2


def _echo_outcome(t, method, tensors, staged: bool, hold: bool):
    if staged:
        with t.request(tensors[0].dtype) as req:
            bufs = [req.alloc(x.shape, x.dtype) for x in tensors]
            for b, x in zip(bufs, tensors):
                b.copy_(x)
            reply = t.call(method, bufs)
    else:
        reply = t.call(method, tensors)
    with reply:
        values = [reply.view(i).clone() for i in range(len(reply))]
        places = [reply.view(i).data_ptr() - t.rsp.native.address for i in range(len(reply))]
        if hold:
            t.call("Matmul", [torch.ones(3)]).release()
    return values, places


@pytest.mark.parametrize("doorbell", ["shm", "zmq"])
def test_the_echo_lane_and_the_calls_in_c_change_no_echo(tmp_path, monkeypatch, doorbell):
    """Differential, as for the model's lane: the same random echo calls (1-3 tensors of six dtypes, shapes that
    repeat and new ones, inputs staged in the ring or copied in, a reply held across a call, 64 KiB rings that
    wrap) to an echo daemon whose lane serves repeated calls, from a client whose calls are made in C (most replies
    accepted and released there), and to one that serves everything from Python, from a Python client: the same
    values at the same places, each the tensors sent; the lane served a good part of them."""
    from shmrt.wire.ring import Consumer
    monkeypatch.setenv("SHMRT_POISON", "1")
    adopted = []   # replies accepted in C (as the only message out), by the consumer that adopted them
    adopt = Consumer.adopt
    monkeypatch.setattr(Consumer, "adopt", lambda self, descs: adopted.append(self) or adopt(self, descs))
    daemons = [EchoDaemon(f"ipc://{tmp_path}/{name}.sock", lane=lane) for name, lane in (("lane", True), ("py", False))]
    pair = None
    try:
        pair = Sessions(daemons, doorbell, ring_bytes=1 << 16)
        rng, shapes = random.Random(5), []
        for step in range(400):
            method, tensors, staged = _random_echo(rng, shapes)
            hold = rng.random() < 0.1
            a, b = (_echo_outcome(t, method, tensors, staged, hold) for t in pair.clients)
            assert a[1] == b[1], step
            for x, y, sent in zip(a[0], b[0], tensors):
                assert torch.equal(x, sent) and torch.equal(y, sent), step
        assert pair.clients[0].req.producer.head > 10 * pair.clients[0].req.capacity   # (the rings wrapped)
        # the first client's calls were made in C, most replies known there by their shape; the second's in Python
        assert pair.clients[0].known_replies >= 150 and pair.clients[1].known_replies == 0
        assert adopted.count(pair.clients[0].rsp.consumer) >= 100 and pair.clients[1].rsp.consumer not in adopted
        pair.close()
        (echoed,) = daemons[0].echoed(1)
        # (a record is the lane's once Python answered it where its request and its reply lie: the lap starts)
        assert echoed >= 60 and daemons[1].echoed(1) == [], (echoed, daemons[1].lines)
    finally:
        if pair is not None:
            pair.close()
        for d in daemons:
            d.close()
