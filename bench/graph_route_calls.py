"""The daemon handler's Python per decode call on a CUDA daemon's routes, measured without a device: the split's own
model and handler in one process (host/inprocess.py), the session given graphs whose capture runs the body once and
whose replay runs it again (what a CUDA replay computes, here on the CPU), that time taken out: what is left is the
Python around each launch (dispatch, checks, the reply's reservation, the graph lookup or the plan). Medians (us) of
handler.handle less its replays per method over N decode steps. (bench/daemon_stages.py's `cpu+plans` times the
whole serving loop the same way.)

    PYTHONPATH=. .venv/bin/python bench/graph_route_calls.py [model (small)] [steps (64)]

On an H200 host (bench/daemon_stages.py) this Python was 25-70 us a call, the graph's launch 12-24 (session 14).
(Until session 17 replays ran nothing: once Embedding and LMHead were graphs too, their replies were whatever lay in
the ring, and the enclave refused them.)"""
import collections
import statistics
import sys
import time

import torch

from shmrt.enclave.generate import Sampler, prefill, decode_n
from shmrt.enclave.llama import EnclaveModel
from shmrt.enclave.ops import RemoteOps
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.graphs import RerunCapture, SessionGraphs
from shmrt.host.inprocess import InProcessCaller
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import load_enclave_part

model = sys.argv[1] if len(sys.argv) > 1 else "small"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 64
w = load_weights(model)
handler = ModelHandler(LinearCompute(w, "cpu", torch.float32), model, "", log=print)
times = collections.defaultdict(list)
orig = handler.handle
on = [False]
def handle(request, builder, session, settle=True):
    replayed = RerunCapture.replay_ns
    t = time.perf_counter_ns()
    try:
        return orig(request, builder, session, settle)
    finally:
        if on[0]:
            spent = time.perf_counter_ns() - t - (RerunCapture.replay_ns - replayed)
            times[request.method + (f" {request.op}" if request.method == "BatchLinear" else "")].append(spent)
handler.handle = handle
with InProcessCaller(handler, torch.float32, 64 << 20) as caller, torch.inference_mode():
    req, rsp = caller.req.native, caller.rsp.native
    caller.session.graphs = SessionGraphs(handler.c, None, req.message_starts, rsp.message_starts, log=print,
                                          capture=RerunCapture)
    m = EnclaveModel(load_enclave_part(w.source), RemoteOps(caller, w.cfg, torch.float32), "daemon", "fewest",
                     score_step=256)
    ids = torch.randint(0, w.cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    decode_n(m, prefill(m, ids), 8, Sampler())
    from shmrt.tools.heap import freeze_heap; freeze_heap()
    logits = prefill(m, ids)
    on[0] = True
    decode_n(m, logits, steps, Sampler())
for k, v in sorted(times.items()):
    if len(v) > steps // 2:
        print(f"{k:24s} {len(v):6d} {statistics.median(v) / 1e3:8.1f} us")
