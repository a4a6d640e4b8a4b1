"""The client's per-call path, in microseconds: what the enclave spends on each call and between calls.

    python bench/client_calls.py [--quick] [--json PATH] [--sections protocol,call,math,e2e]

Sections (each a median over many repeats, with p10/p90):
  protocol  encode (Doorbell built + encoded) and decode of typical decode-step doorbells
  call      one call through the shm transport against an echo daemon in a subprocess, client side only:
            the wall time of request + call + reading the reply, minus the ZeroMQ send and the wait for
            the reply (t_replied - t_encoded); plus the perf log observer's cost per call
  math      EnclaveModel's enclave-side time per layer of a decode step (`small` and the llama3.2-1b
            shape), with ops that cost nothing (canned replies) and with LocalOps (its time subtracted),
            next to the same math as bare torch ops on preallocated tensors (the torch cost)
  e2e       `small` decoding over shm against a real daemon, perf log on (the CLI's default): the enclave's
            time between consecutive calls, and Serialize + Deserialize per call

A script, not a timed test: numbers depend on the machine; compare runs on the same one.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from shmrt import settings  # noqa: E402

settings.apply_process_defaults()   # as the CLI does, before torch loads

import torch  # noqa: E402

from shmrt.enclave.llama import EnclaveModel  # noqa: E402
from shmrt.enclave.ops import RemoteOps  # noqa: E402
from shmrt.model.calls import replied_projections  # noqa: E402
from shmrt.model.checkpoint import load_enclave_part, resolve_model  # noqa: E402
from shmrt.model.config import LlamaConfig  # noqa: E402
from shmrt.wire import protocol  # noqa: E402
from shmrt.wire.native import now_ns  # noqa: E402
from shmrt.wire.protocol import Doorbell, Method, TensorDesc  # noqa: E402
from shmrt.wire.scopes import OpenRequest, PendingRequest, Reply  # noqa: E402

TOKEN = bytes(range(16))
CAP = 1 << 30


def summary(samples_ns: list[float]) -> dict:
    """Median and spread of samples given in ns, in us."""
    q = statistics.quantiles(samples_ns, n=10) if len(samples_ns) > 1 else samples_ns * 9
    return {"median_us": statistics.median(samples_ns) / 1e3, "p10_us": q[0] / 1e3, "p90_us": q[-1] / 1e3,
            "repeats": len(samples_ns)}


def time_batched(fn, inner: int, outer: int) -> dict:
    """fn timed `inner` times back to back per sample (for sub-microsecond resolution), `outer` samples."""
    for _ in range(inner):
        fn()
    samples = []
    for _ in range(outer):
        t0 = now_ns()
        for _ in range(inner):
            fn()
        samples.append((now_ns() - t0) / inner)
    return summary(samples)


# ---- protocol

def _desc(offset, shape, dtype=torch.float32):
    return TensorDesc(offset, math.prod(shape) * dtype.itemsize, dtype, shape)


def doorbells(cfg: LlamaConfig, T: int = 129) -> dict[str, Doorbell]:
    """The doorbells of a decode step of `cfg` (B = S = 1), each as the client or the daemon sends it."""
    D, H, Hkv, hd, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size)
    g = H // Hkv
    return {
        "req BatchLinear x (1)": Doorbell(Method.BatchLinear, 9, TOKEN, 3, 7, 0, 1 << 20,
                                          tensors=(_desc(4096, (1, 1, D)),)),
        "req Matmul q,k (2)": Doorbell(Method.Matmul, 10, TOKEN, 3, 3, 128, 1 << 20,
                                       tensors=(_desc(4096, (1, Hkv, g, hd)), _desc(65536, (1, Hkv, 1, hd)))),
        "rsp BatchLinear q,k,v (3)": Doorbell(Method.BatchLinear, 9, TOKEN, ring_end=1 << 20, work_ns=12345,
                                              tensors=(_desc(0, (1, 1, H * hd)), _desc(16384, (1, 1, Hkv * hd)),
                                                       _desc(32768, (1, 1, Hkv * hd)))),
        "rsp Matmul scores (1)": Doorbell(Method.Matmul, 10, TOKEN, ring_end=1 << 20, work_ns=12345,
                                          tensors=(_desc(0, (1, Hkv, g, T)),)),
    }


def bench_protocol(quick: bool) -> dict:
    cfg = LlamaConfig.from_name("llama3.2-1b")
    inner, outer = (200, 11) if quick else (2000, 31)
    out = {}
    for name, bell in doorbells(cfg).items():
        raw = protocol.encode(bell)
        assert protocol.decode(raw, capacity=CAP, token=TOKEN, expect_seq=bell.seq) == bell
        fields = (bell.method, bell.seq, bell.token, bell.layer, bell.op, bell.pos, bell.ring_end)
        descs = tuple(TensorDesc(d.offset, d.nbytes, d.dtype, d.shape) for d in bell.tensors)
        out[f"encode {name}"] = time_batched(
            lambda: protocol.encode(Doorbell(*fields, work_ns=bell.work_ns, tensors=descs)), inner, outer)
        out[f"decode {name}"] = time_batched(
            lambda: protocol.decode(raw, capacity=CAP, token=TOKEN, expect_seq=bell.seq), inner, outer)
    # The client encodes a request and decodes its reply: the QKV call is the widest of a decode step.
    out["encode+decode of the QKV call"] = {
        "median_us": out["encode req BatchLinear x (1)"]["median_us"]
        + out["decode rsp BatchLinear q,k,v (3)"]["median_us"]}
    return out


# ---- one call through the shm transport (client side)

def _serve_echo(endpoint: str) -> None:
    from shmrt.host.server import EchoHandler, Server
    with Server(endpoint, EchoHandler(), log=lambda m: None) as server:
        server.serve()


def _call_overheads(make_call, repeats: int) -> dict:
    """Client-side ns of `make_call()` (returns a reply, still open, read inside): wall minus the ZeroMQ send
    and the wait (t_replied - t_encoded; the send, reported apart, swings with the scheduler on few cores)."""
    total, enc, dec, send = [], [], [], []
    for i in range(repeats + repeats // 10):
        t0 = now_ns()
        reply = make_call()
        with reply:
            reply.view(0)
        t1 = now_ns()
        s = reply.stats
        if i >= repeats // 10:
            total.append(t1 - t0 - (s.t_replied - s.t_encoded))
            enc.append(s.t_encoded - s.t_start)
            send.append(s.t_sent - s.t_encoded)
            dec.append(s.t_decoded - s.t_replied)
    return {"client": summary(total), "serialize": summary(enc), "send": summary(send), "deserialize": summary(dec)}


def bench_call(quick: bool) -> dict:
    from shmrt.tools.perflog import PerfLog
    from shmrt.wire.peer import client_info
    from shmrt.wire.registry import client_transport

    cfg = LlamaConfig.from_name("llama3.2-1b")
    D, Hkv, hd, g = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.groups
    repeats = 300 if quick else 3000
    tmp = tempfile.mkdtemp(prefix="shmrt-bench-")
    endpoint = f"ipc://{tmp}/echo.sock"
    server = mp.get_context("spawn").Process(target=_serve_echo, args=(endpoint,), daemon=True)
    server.start()
    out = {}
    try:
        with client_transport("shm", endpoint, timeout=60) as t:
            t.hello(client_info())
            t.open_session(4 << 20)
            t.call("Init").release()
            ops = RemoteOps(t, cfg, torch.float32)

            def staged(method, shapes, **args):
                with ops.request() as req:
                    xs = [req.alloc(s) for s in shapes]
                    return t.call(method, xs, wire_dtype=torch.float32, **args)

            def linear_o():
                with ops.request() as req:
                    return ops.linear(0, ["o_proj"], req.alloc((1, 1, D)))

            out["transport.call, 1 tensor each way"] = _call_overheads(
                lambda: staged("BatchLinear", [(1, 1, D)], layer=0), repeats)
            out["transport.call, 2 tensors each way"] = _call_overheads(
                lambda: staged("Matmul", [(1, Hkv, g, hd), (1, Hkv, 1, hd)], layer=0), repeats)
            out["transport.call, 3 tensors each way"] = _call_overheads(
                lambda: staged("BatchLinear", [(1, 1, D), (1, 1, Hkv * hd), (1, 1, Hkv * hd)], layer=0), repeats)
            out["RemoteOps.linear o_proj (shape check)"] = _call_overheads(linear_o, repeats)
            log = PerfLog(os.path.join(tmp, "perf.log"), t.label, {})
            t.observers.append(log)
            out["RemoteOps.linear o_proj + PerfLog"] = _call_overheads(linear_o, repeats)
            t.observers.remove(log)
            stats = linear_o().stats
            out["PerfLog observer per call"] = time_batched(lambda: log(stats), 256, 21 if quick else 101)
            log.close()
    finally:
        server.terminate()
        server.join(5)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return out


# ---- enclave math per layer

class CannedOps:
    """The ops interface with replies that cost nothing: fixed tensors of the shapes each op returns,
    handed out as transport replies are (views released at the end of the with block)."""

    def __init__(self, cfg: LlamaConfig, T: int, wire_dtype=torch.float32):
        gen = torch.Generator().manual_seed(0)
        D, Hkv, hd, g = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.groups

        def t(*shape, dtype=wire_dtype):
            return (0.1 * torch.randn(shape, generator=gen)).to(dtype)
        self.wire_dtype = wire_dtype
        self._requests = OpenRequest(lambda shape, dtype: (torch.empty(shape, dtype=dtype), None), wire_dtype)
        self.embed, self.logits = [t(1, 1, D)], [t(1, cfg.vocab_size, dtype=torch.float32)]
        self.proj = {"q_proj": t(1, 1, cfg.num_attention_heads * hd), "k_proj": t(1, 1, Hkv * hd),
                     "v_proj": t(1, 1, Hkv * hd), "o_proj": t(1, 1, D), "gate_proj": t(1, 1, cfg.intermediate_size),
                     "up_proj": t(1, 1, cfg.intermediate_size), "down_proj": t(1, 1, D)}
        self.scores, self.ctx, self.attn_out = [t(1, Hkv, g, T)], [t(1, Hkv, g, hd)], [t(1, 1, D)]

    def request(self) -> PendingRequest:
        return self._requests.open()

    def _reply(self, tensors) -> Reply:
        self._requests.sent()   # the call is made: it seals its request, as a transport's does
        return Reply(tensors, None, release=lambda: None)

    def embedding(self, ids):
        return self._reply(self.embed)

    def linear(self, layer, names, x, keep_v_at=None):
        return self._reply([self.proj[n] for n in replied_projections(names, keep_v_at is not None)])

    def matmul(self, a, b, *, transpose_b, expect_cols, layer=-1, cache=None, pos=0):
        return self._reply(self.scores if transpose_b else self.ctx)

    def attention_output(self, p, v, *, layer, cache=None, pos=0):
        return self._reply(self.attn_out)

    def attention_scores(self, layer, x, tables, *, pos, width=0):
        return self._reply(self.scores)

    def lm_head(self, x):
        return self._reply(self.logits)


class TimedOps:
    """Wraps an ops object; `ns` accumulates the time spent inside it (the daemon's side, in-process)."""

    def __init__(self, ops):
        self.ops, self.ns = ops, 0
        for name in ("embedding", "linear", "matmul", "attention_output", "attention_scores", "lm_head"):
            setattr(self, name, self._timed(getattr(ops, name)))

    def _timed(self, fn):
        def call(*args, **kw):
            t0 = now_ns()
            try:
                return fn(*args, **kw)
            finally:
                self.ns += now_ns() - t0
        return call

    def request(self):
        return self.ops.request()


def _decode_steps(model: EnclaveModel, timed: TimedOps, steps: int, rewind: int | None) -> list[float]:
    """ns of enclave time per decode step (step wall - time inside ops); `rewind`: repeat one position."""
    out = []
    token = torch.tensor([[1]])
    for _ in range(steps):
        if rewind is not None:
            model.length = rewind
        timed.ns = 0
        t0 = now_ns()
        model.forward(token, model.length)
        out.append(now_ns() - t0 - timed.ns)
    return out


def bare_layer_fn(cfg: LlamaConfig, T: int):
    """One layer's enclave math of a decode step as bare torch ops on preallocated tensors: the torch cost."""
    D, H, Hkv, hd, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size)
    eps, scale, half = cfg.rms_norm_eps, hd ** -0.5, hd // 2
    g = torch.Generator().manual_seed(1)
    h, o, down = (torch.randn(1, 1, D, generator=g) for _ in range(3))
    w1, w2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    q, k = torch.randn(1, 1, H * hd, generator=g), torch.randn(1, 1, Hkv * hd, generator=g)
    cos, sin = torch.randn(1, hd, generator=g), torch.randn(1, hd, generator=g)
    scores = torch.randn(1, Hkv, H // Hkv, T, generator=g)
    gate, up = torch.randn(1, 1, I, generator=g), torch.randn(1, 1, I, generator=g)
    x, var = torch.empty(1, 1, D), torch.empty(1, 1, 1)
    q_out, k_out = torch.empty(1, H, 1, hd), torch.empty(1, Hkv, 1, hd)
    probs, act = torch.empty_like(scores), torch.empty(1, 1, I)

    def rope(src, heads, out):
        x4 = src.view(1, 1, heads, hd).transpose(1, 2)
        torch.mul(x4, cos, out=out)
        out[..., :half].addcmul_(x4[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x4[..., :half], sin[..., half:])

    def norm(w):
        torch.mean(h * h, -1, keepdim=True, out=var)
        torch.mul(h, var.add_(eps).rsqrt_(), out=x)
        x.mul_(w)

    def layer():
        norm(w1)
        rope(q, H, q_out)
        rope(k, Hkv, k_out)
        torch.softmax(scores.mul(scale), -1, out=probs)
        h.add_(o)
        norm(w2)
        torch.mul(torch.nn.functional.silu(gate), up, out=act)
        h.add_(down)
    return layer


def bench_math(quick: bool, presets=("small", "llama3.2-1b")) -> dict:
    from shmrt.host.compute import LinearCompute
    from shmrt.host.local_ops import LocalOps
    from shmrt.host.weights import load_weights

    prompt, steps = 128, (20 if quick else 200)
    out = {}
    torch.set_grad_enabled(False)
    for preset in presets:
        source = resolve_model(preset)
        part = load_enclave_part(source)
        cfg, L = part.cfg, part.cfg.num_hidden_layers
        canned = TimedOps(CannedOps(cfg, prompt + 1))
        model = EnclaveModel(part, canned)
        model.length = prompt
        out[f"{preset}: enclave per layer, canned ops"] = summary(
            [ns / L for ns in _decode_steps(model, canned, steps, rewind=prompt)])
        # LocalOps computes the real thing: two layers suffice for a per-layer number.
        small = resolve_model(preset, layers=2)
        local = TimedOps(LocalOps(LinearCompute(load_weights(small), "cpu", torch.float32), torch.float32))
        model = EnclaveModel(load_enclave_part(small), local)
        model.forward(torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)), 0)
        out[f"{preset}: enclave per layer, LocalOps"] = summary(
            [ns / 2 for ns in _decode_steps(model, local, max(steps // 4, 10), rewind=None)])
        del model, local
        out[f"{preset}: bare torch per layer"] = time_batched(bare_layer_fn(cfg, prompt + 1), 20, 21 if quick else 101)
    return out


# ---- end to end: the enclave's time between calls

def bench_e2e(quick: bool) -> dict:
    from shmrt.enclave.client import EnclaveClient
    from shmrt.enclave.generate import Sampler, generate
    from shmrt.tools.process import DaemonProcess, daemon_argv

    tmp = tempfile.mkdtemp(prefix="shmrt-bench-")
    endpoint = f"ipc://{tmp}/d.sock"
    prompt, new = 128, (8 if quick else 32)
    calls = []
    try:
        with DaemonProcess(daemon_argv("small", "cpu", "float32", None), endpoint, quiet=True), \
                EnclaveClient(endpoint=endpoint, model="small", timeout=60, prompt_tokens=prompt,
                              total_tokens=prompt + new, log_path=f"{tmp}/perf.log") as c, torch.inference_mode():
            c.transport.observers.append(calls.append)
            ids = torch.randint(0, c.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
            generate(c.model, ids, new, Sampler())
    finally:
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    per_step = 2 + 5 * LlamaConfig.from_name("small").num_hidden_layers  # fused calls
    decode = calls[-(new - 1) * per_step:]
    gaps = [b.t_start - a.t_decoded for a, b in zip(decode, decode[1:]) if b.method != "Embedding"]
    client = [s.serialize_ns + s.deserialize_ns for s in decode]
    return {"small over shm: enclave time between calls": summary(gaps),
            "small over shm: serialize + deserialize per call": summary(client),
            "small over shm: decode step": summary([b.t_start - a.t_start for a, b in zip(decode, decode[1:])
                                                    if b.method == "Embedding"])}


SECTIONS = {"protocol": bench_protocol, "call": bench_call, "math": bench_math, "e2e": bench_e2e}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'':56} {'median us':>10} {'p10':>9} {'p90':>9}")
    for name, r in rows.items():
        for sub, s in ({name: r} if "median_us" in r else {f"{name} [{k}]": v for k, v in r.items()}).items():
            p10 = f"{s['p10_us']:9.1f}" if "p10_us" in s else " " * 9
            p90 = f"{s['p90_us']:9.1f}" if "p90_us" in s else " " * 9
            print(f"{sub:56} {s['median_us']:10.1f} {p10} {p90}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = {}
    for name in args.sections.split(","):
        results[name] = SECTIONS[name](args.quick)
        print_table(name, results[name])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
