"""host/graphs.py's routes on a CPU: the daemon's handler driven through real rings (the in-process caller), its
session given graphs whose capture is a stand-in that runs the captured body again on replay. That body reads the
request ring and writes the reply at the addresses a CUDA graph would, so what this checks is everything but
CUDA: which calls take a graph, the keys and families, lap starts, the position word, K/V commits and zeroing,
the drop of graphs holding let-go K/V buffers. Values against transformers; GPU runs of the same: test_graphs.py."""
import pytest
import torch

from conftest import random_ids
from shmrt.enclave.generate import Sampler, generate
from shmrt.enclave.llama import EnclaveModel
from shmrt.enclave.ops import RemoteOps
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.graphs import SessionGraphs
from shmrt.host.inprocess import InProcessCaller
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import load_enclave_part


class RerunBody:
    """A capture's stand-in: the body's warm-up run, then every replay runs it again."""

    replays = 0

    def __init__(self, body, keep, pool, stream, device):
        self.body, self._keep = body, keep
        body()

    def replay(self):
        RerunBody.replays += 1
        return self.body()


@pytest.mark.parametrize("calls,step", [("fewest", 8), ("fewest", 1), ("v2.4", 8)])
def test_graph_routes_give_transformers_tokens_and_are_taken(checkpoints, calls, step):
    path, hf = checkpoints["gqa-tied-llama3"]
    w = load_weights(str(path))
    handler = ModelHandler(LinearCompute(w, "cpu", torch.float32), "test", "", log=lambda m: None)
    with InProcessCaller(handler, torch.float32, 256 << 10) as caller:
        req, rsp = caller.req.native, caller.rsp.native
        graphs = caller.session.graphs = SessionGraphs(handler.c, None, req.message_starts, rsp.message_starts,
                                                       log=print, capture=RerunBody)
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
            before = RerunBody.replays
            assert generate(model, ids, new, Sampler()).tokens == ref, (calls, step, n)
            # every decode step's calls of every layer replayed (none fell back to eager but the first, captured)
            layers = w.cfg.num_hidden_layers
            # fewest padded: AttentionScores and AttentionOutput whole, gate|up, down; unpadded: AttentionScores'
            # projections and RoPE, gate|up, down; v2.4: its four BatchLinears (its products run eagerly)
            per_step = {("fewest", 8): 4, ("fewest", 1): 3, ("v2.4", 8): 4}[calls, step]
            assert RerunBody.replays - before >= per_step * layers * (new - 2), (calls, step, n)
        assert graphs.on and 0 < len(graphs.graphs)
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
    graphs = SessionGraphs(c, None, [p.data_ptr() for p in ps], [out.data_ptr()], log=print, capture=RerunBody)
    graphs.width_step = W
    old_v, new_v = (torch.rand(1, cfg.num_key_value_heads, rows, cfg.head_dim) for rows in (16, 32))
    for p in ps:
        assert graphs.output(0, p, old_v[:, :, :W], out)
    assert len(graphs.graphs) == 2
    assert graphs.output(0, ps[0], new_v[:, :, :W], out)   # the store grew V's buffer
    assert len(graphs.graphs) == 1 and not any(old_v.data_ptr() in held for families in graphs.families.values()
                                               for _, held in families.values())
    torch.testing.assert_close(out, c.output_product(0, ps[0], new_v[:, :, :W]))
