"""Where a daemon's time goes per decode call, by stage, on a real split run: the daemon runs in this process,
instrumented (the shm session's take, decode, reply and post, the handler's handle and settle, the graphs' replay,
each stamped as it returns), and a client process decodes three rounds; the last round's decode calls are reported.

    PYTHONPATH=. python bench/daemon_stages.py llama3.2-1b cuda 1024 49      # model device prompt tokens
    PYTHONPATH=. python bench/daemon_stages.py echo cpu 4096 20000           # the micro suite's 4 KiB echo calls
    PYTHONPATH=. python bench/daemon_stages.py small cpu+plans 1024 65        # a CUDA daemon's Python, on a CPU

The planned lane (shmrt/host/lane.py) serves planned calls in C, where no stage can be stamped: it is off here
(SHMRT_PLANNED_LANE=0) unless the environment turns it on, and then the table lists the calls Python served.

`cpu+plans`: the daemon on the CPU running decode steps as a CUDA daemon does, graphs and plans included, each
replay running its body again on the CPU (`launch` is then that compute, `settle` ~0): `handle` less `launch` is the
Python a CUDA daemon spends around a call, measured where there is no GPU. (An optional 5th argument: layers.)

With `echo` the daemon is the micro suite's (EchoHandler) and the client makes rounds of round trips of `prompt`
bytes (`tokens` a round) instead of decoding.

Stages per call (us, medians over the decode phase, by method):
  take     C take + check of the bell record (+ its shape: bell.py's RecordShape, made once per record)
  decode   the Request built (accept_views)
  handle   handler.handle up to return (checks, reply alloc, graph key, launch) -- of which `launch` is replay()
  ahead    the reply encoded ahead (CUDA)
  settle   the one synchronize
  finish   request released, reply finished (publish, work_ns)
  post     the reply rung
  gap      from posting the reply to taking the next request (the client's side of the round trip)"""
import collections
import os
import statistics
import subprocess
import sys
import threading

os.environ.setdefault("SHMRT_PLANNED_LANE", "0")   # (before shmrt reads it: see the docstring)

from shmrt import settings

# As the CLI does before torch loads: without it, on 2 cores, the daemon's OpenMP workers spun after each parallel op
# and the client saw a 513 KB reply (LMHead's) 2-5 ms late
settings.apply_process_defaults()

import torch  # noqa: E402

import shmrt.host.graphs as gr
import shmrt.host.server as srv
import shmrt.wire.shm_transport as st
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.handler import Call, EchoHandler
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import model_digest, resolve_model
from shmrt.wire.native import now_ns

model, device = sys.argv[1], sys.argv[2]
prompt, tokens = int(sys.argv[3]), int(sys.argv[4])
layers = int(sys.argv[5]) if len(sys.argv) > 5 else None
stand_in = device == "cpu+plans"
device = "cpu" if stand_in else device
rec = []          # per call: dict of stage -> ns, method
cur = {}

def stamp(owner, name: str, key: str) -> None:
    """Wrap `owner.name` so that the call being served notes when it returned, as `key`."""
    inner = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = inner(*args, **kwargs)
        cur[key] = now_ns()
        return result
    setattr(owner, name, wrapped)


orig_take = st.ShmServerSession.take_bell


def take_bell(self):
    t0 = now_ns()
    r = orig_take(self)
    if r is not None:
        cur.clear()
        cur["t_take0"], cur["t_take1"] = t0, now_ns()
    return r


orig_post = st.ShmServerSession.post_reply


def post_reply(self, payload):
    t0 = now_ns()
    orig_post(self, payload)
    if "t_take0" in cur:   # a call rung through the ring (the socket's messages are not timed)
        cur["t_post0"], cur["t_post1"] = t0, now_ns()
        rec.append(dict(cur))
        cur.clear()


def timed_replay(inner):
    """A replay (a CUDA graph's, or cpu+plans' stand-in rerunning its body) counted as the call's launch."""
    def replay(self):
        t0 = now_ns()
        out = inner(self)
        cur["launch"] = cur.get("launch", 0) + now_ns() - t0
        return out
    return replay


st.ShmServerSession.take_bell = take_bell
st.ShmServerSession.post_reply = post_reply
for captured in (gr.CapturedCall, gr.RerunCapture):
    captured.replay = timed_replay(captured.replay)
# Server._serve's steps, in its order: each stamped as it returns (the request's release falls in `finish`)
stamp(st.ShmServerSession, "decode", "t_decoded")
stamp(st.ShmServerSession, "encode_reply_ahead", "t_ahead")    # CUDA only: elsewhere ahead = handled
stamp(st.ShmServerSession, "finish_reply", "t_finished")       # CUDA
stamp(st.ShmServerSession, "encode_reply", "t_finished")       # elsewhere

def install_stand_in_graphs(handler: ModelHandler) -> None:
    """A CPU daemon that runs decode steps as a CUDA one does: graphs (stand-ins) and plans from Init on, and
    decode scores padded (Hello's score_width_step)."""
    init = handler.calls["Init"].compute

    def init_with_graphs(self, s, request, builder):
        init(self, s, request, builder)
        s.graphs = gr.SessionGraphs(self.c, None, *(b.message_starts for b in s.pinned_buffers()), print,
                                    capture=gr.RerunCapture)

    handler.calls = {**handler.calls, "Init": Call("Init", 0, init_with_graphs)}
    hello = handler.hello
    handler.hello = lambda: {**hello(), "score_width_step": gr.SCORE_WIDTH_STEP}


ep = f"ipc:///tmp/ds-{os.getpid()}.sock"
if model == "echo":   # the micro suite's calls: an echo daemon, `prompt` bytes a round trip, `tokens` round trips a round
    handler, skipped = EchoHandler(), 0
    client_code = f"""
import torch, time
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport
t = client_transport("shm", {ep!r}, timeout=60, doorbell="shm")
t.hello(client_info())
t.open_session(4 << 20)
t.call("Init").release()
x = torch.randn({prompt} // 4)
for r in range(3):
    start = time.monotonic_ns()
    for _ in range({tokens}):
        t.call("Matmul", [x]).release()
    print(f"round {{r}}: {{(time.monotonic_ns() - start) / {tokens} / 1e3:.1f}} us a round trip", flush=True)
    print("MARK", flush=True)
t.close()
"""
else:
    source = resolve_model(model, layers, 0)
    w = load_weights(source, dtype=torch.float32, device=device)
    handler = ModelHandler(LinearCompute(w, device, torch.float32), model, model_digest(source), log=print)
    if stand_in:
        install_stand_in_graphs(handler)
    skipped = 2 + 4 * w.cfg.num_hidden_layers   # a round's prefill calls (Embedding, four a layer, LMHead)
    client_code = f"""
import torch, time
from shmrt.enclave.client import EnclaveClient
from shmrt.model.checkpoint import resolve_model
from shmrt.enclave.generate import Sampler, generate
from shmrt.tools.heap import freeze_heap
with EnclaveClient(endpoint={ep!r}, model=resolve_model({model!r}, {layers!r}, 0), transport="shm", timeout=600, prompt_tokens={prompt},
                   total_tokens={prompt + tokens + 1}) as c, torch.inference_mode():
    freeze_heap()
    ids = torch.randint(0, c.model.cfg.vocab_size, (1, {prompt}), generator=torch.Generator().manual_seed(1))
    for r in range(3):
        g = generate(c.model, ids, {tokens}, Sampler(), decode_threads=1)
        print(f"round {{r}}: decode {{g.decode_s/({tokens}-1)*1e3:.2f}} ms/token", flush=True)
        print("MARK", flush=True)
"""
orig_handle = handler.handle


def handle(request, builder, session, settle=True):
    cur["method"] = request.method + (f" {request.op}" if request.method == "BatchLinear" else "")
    return orig_handle(request, builder, session, settle)


handler.handle = handle
stamp(handler, "handle", "t_handled")
stamp(handler, "settle", "t_settled")
with torch.inference_mode(), srv.Server(ep, handler, log=lambda m: None) as server:
    proc = subprocess.Popen([sys.executable, "-c", client_code], stdout=subprocess.PIPE, text=True)
    marks = []
    def reader():
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            if line.startswith("MARK"):
                marks.append(len(rec))
    lines = threading.Thread(target=reader, daemon=True)
    lines.start()
    server.serve(until=lambda: proc.poll() is not None)
    lines.join(10)
if model == "echo":   # the last round's calls: its `tokens` round trips, the last rung (Close travels over ZeroMQ)
    calls = rec[-tokens:]
else:                 # the last round's decode calls: past its prefill's (`skipped`)
    start = marks[-2] if len(marks) >= 2 else 0
    calls = rec[start:][skipped:]
by = collections.defaultdict(lambda: collections.defaultdict(list))
for i, c in enumerate(calls):
    if "t_settled" not in c:
        continue
    m = c.get("method", "?")
    s = by[m]
    s["take"].append(c["t_take1"] - c["t_take0"])
    s["decode"].append(c["t_decoded"] - c["t_take1"])
    s["handle"].append(c["t_handled"] - c["t_decoded"])
    s["launch"].append(c.get("launch", 0))
    ahead = c.get("t_ahead", c["t_handled"])
    s["ahead"].append(ahead - c["t_handled"])
    s["settle"].append(c["t_settled"] - ahead)
    s["finish"].append(c["t_finished"] - c["t_settled"])
    s["post"].append(c["t_post1"] - c["t_finished"])
    if i + 1 < len(calls):
        s["gap"].append(calls[i + 1]["t_take0"] - c["t_post1"])
cols = ["take", "decode", "handle", "launch", "ahead", "settle", "finish", "post", "gap"]
print(f"{'method':24s} {'calls':>6} " + " ".join(f"{c:>8}" for c in cols))
for m, s in sorted(by.items()):
    print(f"{m:24s} {len(s['take']):>6} " + " ".join(f"{statistics.median(s[c]) / 1e3 if s[c] else 0:8.1f}" for c in cols))
