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
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import Sampler, generate
from shmrt.errors import PeerError
from shmrt.host.compute import LinearCompute
from shmrt.host.weights import load_weights
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport

SERVED = re.compile(r"\((\d+) planned calls served in C[,)]")


def _serve(model: str, endpoint: str, logs, stop, width_step: int, lane: bool, device: str) -> None:
    """A daemon: the model's handler (on a CPU with plans), the lane on or off, scores padded to `width_step`."""
    os.environ["SHMRT_PLANNED_LANE"] = "1" if lane else "0"
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
        ctx = multiprocessing.get_context("spawn")
        self.endpoint = endpoint
        self.logs, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(model, endpoint, self.logs, self.stop, width_step, lane, device),
                                daemon=True)
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
    them), now and then one the daemon refuses (a position off by one, P wider than the cache's room, P over an
    empty cache): (method, tensors, layer, op, pos)."""
    from shmrt.model.calls import matmul_bits, projection_bits
    Hkv, g, hd = cfg.num_key_value_heads, cfg.groups, cfg.head_dim
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    layer = rng.choice([0, 0, 1])
    kind = rng.choice(["scores"] * 4 + ["output"] * 3 + ["matmul", "gate_up", "down", "restart"])
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
        return "AttentionScores", tensors, layer, rng.choice([padded] * 4 + [padded + 8, 0]), max(pos, 0)
    if kind == "matmul":
        cache, rows = rng.choice(["k", "v"]), rng.randint(1, 2)
        a = torch.randn(1, Hkv, g, hd if cache == "k" else max(pos, 0) + rows, generator=gen)
        return "Matmul", [a, torch.randn(1, Hkv, rows, hd, generator=gen)], layer, matmul_bits(cache == "k", cache), \
            max(pos, 0)
    if kind == "gate_up":
        return "BatchLinear", [torch.randn(1, 1, cfg.hidden_size, generator=gen)], layer, \
            projection_bits(["gate_proj", "up_proj"]), 0
    return "BatchLinear", [torch.randn(1, 1, cfg.intermediate_size, generator=gen)], layer, \
        projection_bits(["down_proj"]), 0


def _open(endpoint: str):
    t = client_transport("shm", endpoint, timeout=30)
    t.hello(client_info())
    t.open_session(1 << 20)
    t.call("Init").release()
    return t


@pytest.mark.parametrize("seed", range(2))
def test_the_lane_changes_no_outcome_of_random_call_sequences(tmp_path, monkeypatch, seed):
    """Differential: the same random decode-shaped calls (steps at the right position and off it, two padded widths,
    P naming V or K, K/V rows that restart or grow a cache, the MLP's projections, a reply held across a call) to a
    daemon whose lane serves what its plans answer and to one that serves everything from Python: every reply the
    same values at the same places in the response ring, every refusal the same message (a refusal ends the session
    on both: each opens a new one), and the lane served a good part of them."""
    monkeypatch.setenv("SHMRT_POISON", "1")
    cfg = load_weights("tiny").cfg
    daemons = [Daemon("tiny", f"ipc://{tmp_path}/{name}.sock", width_step=8, lane=lane)
               for name, lane in (("lane", True), ("python", False))]
    clients = []
    try:
        clients = [_open(d.endpoint) for d in daemons]
        rng = random.Random(seed)
        filled, sessions = [0, 0], 1
        for step in range(250):
            method, tensors, layer, op, pos = _random_call(rng, cfg, filled)
            hold = rng.random() < 0.1
            outcomes = []
            for t in clients:
                try:
                    reply = t.call(method, tensors, layer=layer, op=op, pos=pos)
                except PeerError as exc:
                    outcomes.append(("refused", str(exc).split(": ", 1)[1]))
                    continue
                with reply:
                    values = [reply.view(i).clone() for i in range(len(reply))]
                    places = [reply.view(i).data_ptr() - t.rsp.native.address for i in range(len(reply))]
                    if hold:   # the next reply lands elsewhere while this one is held
                        t.call("BatchLinear", [torch.zeros(1, 1, cfg.hidden_size)], layer=0, op=48).release()
                outcomes.append(("ok", values, places))
            a, b = outcomes
            assert a[0] == b[0], (step, method, a, b)
            if a[0] == "refused":
                assert a[1] == b[1], (step, method)
                for t in clients:
                    t.close()
                clients = [_open(d.endpoint) for d in daemons]
                filled, sessions = [0, 0], sessions + 1
            else:
                assert all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2], (step, method, op, pos)
                if method == "AttentionScores":   # (a guide for the next calls' positions, no more)
                    filled[layer] = pos + 1
        for t in clients:
            t.close()
        clients = []
        served = daemons[0].served(sessions)
        assert sum(served) >= 20 and daemons[1].served(sessions) == [], served
    finally:
        for t in clients:
            t.close()
        for d in daemons:
            d.close()


def test_a_planned_embedding_refuses_an_id_out_of_the_vocabulary_as_the_python_path_does(tmp_path):
    """Once a decode step's Embedding has a plan, an id outside the vocabulary (read once, in C) is still the
    handler's to refuse, with its message; the next session's steps are served in C again."""
    daemon = Daemon("tiny", f"ipc://{tmp_path}/d.sock")
    try:
        vocab = LinearCompute(load_weights("tiny"), "cpu", torch.float32).cfg.vocab_size
        for bad in (vocab, -1, 1 << 40):
            t = _open(daemon.endpoint)
            try:
                for token in (5, 6, 7):
                    with t.call("Embedding", [torch.tensor([[token]])]) as reply:
                        row = reply.view(0).clone()
                with pytest.raises(PeerError, match=r"token id out of range"):
                    t.call("Embedding", [torch.tensor([[bad]])])
            finally:
                t.close()
        served = daemon.served(3)
        assert len(served) == 3 and all(n >= 1 for n in served), daemon.lines
        assert row.shape[-1] > 0
    finally:
        daemon.close()


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
