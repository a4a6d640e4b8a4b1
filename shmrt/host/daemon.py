"""The GPU side: serves Init / Embedding / BatchLinear / Matmul / AttentionScores / AttentionOutput / LMHead from one
model, through one method table (`ModelHandler.calls`: name, arity, compute function) and one typed session per
client.

Request tensors arrive as views on the client's ring (zero copy: on CUDA the ring is registered
with cudaHostRegister once per session, so `.to(device)` is DMA straight from it); results are
written straight into the response ring (on CUDA a DMA into the registered mapping).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import settings
from .compute import KVStore, LinearCompute, write_parts
from .graphs import SCORE_WIDTH_STEP, OutputPlan, Plan, RerunCapture, SessionGraphs
from .lane import PlannedLane, lane_for
from ..errors import ProtocolError, SetupError
from ..model.calls import linear_args, matmul_args, replied_projections
from ..wire.protocol import dtype_from_name
from .handler import Call, Handler, HandlerSession, table
from .server import Server, check_can_listen
from ..wire.transport import ReplyBuilder, Request
from ..model.checkpoint import model_digest, resolve_model
from .weights import load_weights
from ..tools.heap import freeze_heap

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HostRegistration:
    """cudaHostRegister for a session's ring mappings; unregistered before they are unmapped."""

    def __init__(self, buffers, log):
        self.pointers = []
        cudart = torch.cuda.cudart()
        for mapped in buffers:
            rc = cudart.cudaHostRegister(mapped.address, mapped.nbytes, 0)
            if int(rc) != 0:
                log(f"cudaHostRegister failed ({rc}); copies to/from this ring fall back to pageable")
                continue
            self.pointers.append(mapped.address)

    def release(self) -> None:
        cudart = torch.cuda.cudart()
        for ptr in self.pointers:
            cudart.cudaHostUnregister(ptr)
        self.pointers = []


def default_kv_quota(device: torch.device) -> int:
    """A quarter of the compute device's memory per session: one client cannot starve the others."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


@dataclass
class ModelSession(HandlerSession):
    """One client's state on the daemon: the dtype its tensors travel in, its K/V store (from Init on),
    and, on CUDA, the registration of its transport's buffers for DMA and the decode graphs that copy from and
    to them (from Init on)."""

    wire: torch.dtype
    pinned_buffers: Callable[[], list]
    lane_parts: Callable[[], object] = lambda: None
    kv: KVStore | None = None
    registration: HostRegistration | None = None
    graphs: SessionGraphs | None = None
    lane: PlannedLane | None = None

    def summary(self) -> str:
        if self.lane is None:
            return ""
        launched = f", {self.lane.launched} CUDA graphs launched from C" if self.lane.cuda else ""
        return f" ({self.lane.served} planned calls served in C{launched})"

    def close(self) -> None:
        if self.graphs is not None:   # they hold the rings' addresses: gone before the rings are unregistered
            self.graphs.close()   # (its lane first: it launches them)
            self.graphs = self.lane = None
        if self.registration is not None:
            self.registration.release()  # before the transport unmaps what it registered
            self.registration = None
        self.kv = None


class ModelHandler(Handler):
    def __init__(self, compute: LinearCompute, model_name: str, digest: str, log=print,
                 max_kv_bytes: int | None = None, cpu_plans: bool | None = None):
        self.c = compute
        self.model_name = model_name
        self.digest = digest
        self.log = log
        self.cuda = compute.device.type == "cuda"
        # decode calls remembered as plans (graphs.py): CUDA graphs on a GPU; on a CPU, their bodies run again
        # (RerunCapture), so that the planned lane (lane.py) serves them without the per-call Python
        self.make_plans = settings.cuda_graphs() if self.cuda else (settings.cpu_plans() if cpu_plans is None else cpu_plans)
        # Every copy and product of a call is queued on this stream (the daemon uses no other): one wait on it
        # per call, one call into torch (torch.cuda.synchronize(device) enters and leaves a device context too).
        if self.cuda and compute.device.index is not None:   # the thread's current device: the planned lane launches
            torch.cuda.set_device(compute.device)                  # and waits through the CUDA runtime
        self._stream = torch.cuda.current_stream(compute.device) if self.cuda else None
        self.overlaps_device = self.cuda
        self.max_kv_bytes = max_kv_bytes if max_kv_bytes is not None else default_kv_quota(compute.device)
        self._projections: dict[int, tuple[tuple[str, ...], bool]] = {}  # BatchLinear op bits -> (names, keep_v)

    def hello(self) -> dict:
        # The client computes with nothing of this: it checks `digest` against its own copy of the model
        # and takes the rest as labels for its log.
        # `score_width_step` is a hint (model/calls.py): where this daemon replays decode steps as graphs (CUDA, shm
        # sessions whose rings it registered), padded scores keep one shape; shm clients follow it, others pad nothing.
        return {"model": self.model_name, "digest": self.digest, "device": str(self.c.device),
                "dtype": str(self.c.dtype).replace("torch.", ""),
                "score_width_step": SCORE_WIDTH_STEP if self.make_plans else 1}

    def open(self, client_info: dict, pinned_buffers, lane_parts=lambda: None) -> ModelSession:
        wire = dtype_from_name(client_info.get("wire_dtype", "float32"), "wire_dtype")
        if wire not in (torch.float32, torch.bfloat16, torch.float16):
            raise ProtocolError(f"wire_dtype {wire} is not a floating type")
        return ModelSession(wire, pinned_buffers, lane_parts)

    def handle(self, request: Request, builder: ReplyBuilder, session: ModelSession, settle: bool = True) -> str:
        """The dispatcher's work, then on CUDA one wait for the device (`settle`), also when the call failed.

        Every copy of the call is queued non-blocking: request views -> device (DMA from the registered
        request ring), device -> reply buffers (DMA into the response ring). The request may be released (the
        client overwrites it) and the reply published only once no DMA reads the one or writes the other: one
        synchronize per call, not one per result. The server asks for it itself (`settle` False: then it settles,
        also after an error) once it has encoded the reply's doorbell, which names where the results lie, not what
        they hold: that work overlaps the device's."""
        try:
            if session.graphs is not None and session.graphs.replay_planned(request, builder, session.kv):
                return ""   # a decode call seen before, its checks' answers and graph found by its record
            return super().handle(request, builder, session)
        finally:
            if settle:
                self.settle(session)

    def settle(self, session: ModelSession) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    @staticmethod
    def _put(builder: ReplyBuilder, result: torch.Tensor, dtype: torch.dtype) -> None:
        """Queue a result's copy into the reply, converted to `dtype` (on the device, then a DMA; on CPU one
        converting copy). Non-blocking: `handle` waits for the device before the reply is published."""
        builder.alloc(result.shape, dtype).copy_(result, non_blocking=True)

    @staticmethod
    def _room(builder: ReplyBuilder, dtype: torch.dtype) -> int:
        """Elements of `dtype` a reply can carry: every op checks its result against it before computing."""
        return builder.capacity // dtype.itemsize

    # ---- compute functions, one per row of the table below: (session, request, reply builder)

    def _init(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        # The session's state; the enclave has its own half of the model already.
        s.kv = self.c.new_kv_store(self.max_kv_bytes)
        buffers = s.pinned_buffers()
        if self.cuda:
            s.registration = HostRegistration(buffers, self.log)
            if len(buffers) == 2 and len(s.registration.pointers) == 2 and self.make_plans:
                s.graphs = SessionGraphs(self.c, self._stream, *(b.message_starts for b in buffers), self.log)
        elif len(buffers) == 2 and self.make_plans:
            s.graphs = SessionGraphs(self.c, None, *(b.message_starts for b in buffers), self.log, capture=RerunCapture)
        if s.graphs is not None and settings.planned_lane():
            s.lane = lane_for(s.lane_parts(), s.graphs, s.kv, self.c.cfg.vocab_size)

    def _embedding(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        ids = request.tensors[0]
        if ids.numel() != 1:
            self._put(builder, self.c.embedding(ids, self._room(builder, s.wire)), s.wire)
            return
        # a decode step: its id read once and checked here, its row looked up by a graph where it has one, else
        # copied straight into the reply
        shape = self.c.check_embedding(ids, self._room(builder, s.wire))
        token = self.c.decode_token(ids)
        out = builder.alloc(shape, s.wire)
        plan = s.graphs.embedding(token, ids, out) if s.graphs else None
        if plan is not None:
            s.graphs.remember(request, builder, plan)
            return
        out.copy_(self.c.embedding_rows(token).view(shape), non_blocking=True)

    def _batch_linear(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        args = self._projections.get(request.op)
        if args is None:  # unknown bits raise here, so at most two entries per subset of the 7 projections
            names, keep_v = linear_args(request.op)
            args = self._projections[request.op] = (tuple(names), keep_v)
        names, keep_v = args
        x, layer = request.tensors[0], request.layer
        rows = self.c.linear_rows(layer, names, x, self._room(builder, s.wire))
        B, S = x.shape[:2]
        replied = [(B, S, self.c.rows[n]) for n in replied_projections(names, keep_v)]
        outs, joined = builder.alloc_joined(replied, s.wire)
        graph, v = s.graphs.linear(layer, names, rows, x, outs, joined, s.wire, keep_v) if s.graphs else (None, None)
        if graph is not None and not keep_v:   # (V's rows go into the cache eagerly: no plan)
            s.graphs.remember(request, builder, Plan(graph))
        if graph is None:
            parts, whole, v = self.c.project(layer, names, rows, self.c.to_device(x), s.wire, keep_v)
            write_parts(outs, joined, parts, whole)
        if keep_v:
            self.c.keep_v_rows((s.kv, request.pos), layer, v)

    @staticmethod
    def _factors(request: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A product's two factors, or one (the other in the K/V cache, kept by an earlier call); the table's
        arity (1, 2) has been checked."""
        return request.tensors[0], (request.tensors[1] if len(request.tensors) == 2 else None)

    def _matmul(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        transpose_b, cache = matmul_args(request.op)
        a, b = self._factors(request)
        self._put(builder, self.c.matmul(a, b, transpose_b=transpose_b, cache=cache, layer=request.layer,
                                         pos=request.pos, kv=s.kv, max_elements=self._room(builder, s.wire)), s.wire)

    def _attention_output(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        _, cache = matmul_args(request.op)
        p, v = self._factors(request)
        vd = self.c.output_factor(p, v, layer=request.layer, cache=cache, pos=request.pos, kv=s.kv,
                                  max_elements=self._room(builder, s.wire))
        out = builder.alloc((p.shape[0], p.shape[2] // self.c.cfg.groups, self.c.cfg.hidden_size), s.wire)
        graph = s.graphs.output(request.layer, p, vd, out) if v is None and s.graphs else None
        if graph is not None:
            s.graphs.remember(request, builder, OutputPlan(graph, request.layer, p.shape[3], cache, s.kv))
            return
        out.copy_(self.c.output_product(request.layer, self.c.to_device(p), vd), non_blocking=True)

    def _attention_scores(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        x, tables, layer, pos, width = *request.tensors, request.layer, request.pos, request.op
        rows = self.c.scores_rows(layer, x, tables, pos, s.kv, width, self._room(builder, s.wire))
        cfg = self.c.cfg
        B, S = x.shape[:2]
        out = builder.alloc((B, cfg.num_key_value_heads, cfg.groups * S, width or pos + S), s.wire)
        plan = s.graphs.scores(layer, rows, x, tables, pos, width, s.kv, out) if s.graphs else None
        if plan is not None:
            s.graphs.remember(request, builder, plan)
            return
        rotated = s.graphs.rotation(layer, rows, x, tables) if s.graphs else None
        if rotated is None:
            rotated = self.c.rotated_qkv(layer, rows, self.c.to_device(x), self.c.to_device(tables, 2, torch.float32))
        out.copy_(self.c.keep_and_score(layer, *rotated, pos, s.kv, width), non_blocking=True)

    def _lm_head(self, s: ModelSession, request: Request, builder: ReplyBuilder) -> None:
        x = request.tensors[0]
        out = builder.alloc(self.c.check_lm_head(x, self._room(builder, torch.float32)), torch.float32)
        graph = s.graphs.lm_head(x, out) if s.graphs else None
        if graph is not None:
            s.graphs.remember(request, builder, Plan(graph))
            return
        out.copy_(self.c.logits(self.c.to_device(x)), non_blocking=True)

    calls = table(
        Call("Init", arity=0, compute=_init),
        Call("Embedding", arity=1, compute=_embedding),
        Call("BatchLinear", arity=1, compute=_batch_linear),
        Call("Matmul", arity=(1, 2), compute=_matmul),   # 2 tensors, or 1 with the other in the K/V cache
        Call("LMHead", arity=1, compute=_lm_head),
        Call("AttentionOutput", arity=(1, 2), compute=_attention_output),
        Call("AttentionScores", arity=2, compute=_attention_scores),   # x and the enclave's RoPE tables
    )


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {device}: this torch build or machine has no CUDA device; use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SetupError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return f"cuda:{index}"
    raise SetupError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def run_daemon(*, model: str, device: str, dtype: str, endpoint: str, layers: int | None = None,
               seed: int = 0, session_timeout: float = 120.0, allow_remote: bool = False,
               max_kv_mib: float | None = None, ready=None, quiet: bool = False) -> int:
    """Load the model, serve until SIGTERM/SIGINT. `ready()` is called once listening."""
    device = check_device(device)
    # before the model loads (minutes, and a second copy of the weights on a device)
    check_can_listen(endpoint, allow_remote)
    log = (lambda msg: None) if quiet else (lambda msg: print(f"shmrt daemon: {msg}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    source = resolve_model(model, layers, seed)
    weights = load_weights(source, dtype=COMPUTE_DTYPES[dtype], device=device)
    digest = model_digest(source)
    compute = LinearCompute(weights, device, COMPUTE_DTYPES[dtype])
    cfg = weights.cfg
    log(f"model {model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}) "
        f"on {device} {dtype}, loaded in {time.perf_counter() - t0:.1f} s")
    quota = int(max_kv_mib * 2**20) if max_kv_mib is not None else None
    with Server(endpoint, ModelHandler(compute, model, digest, log, quota), session_timeout=session_timeout,
                allow_remote=allow_remote, log=log) as server:
        def stop(signum, frame):
            server.stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        freeze_heap()   # the weights and imports, out of the collector's walks (tools/heap.py): before a client comes
        log(f"listening on {endpoint}")
        if ready:
            ready()
        # Nothing here is ever differentiated: without autograd's bookkeeping each torch op dispatches in fewer
        # steps (a decode call is a handful of small ops, each paid on the daemon's CPU)
        with torch.inference_mode():
            server.serve()
    log("stopped")   # after the sessions' own lines (Server.close)
    return 0
