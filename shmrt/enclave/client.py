"""The enclave side: a session with the daemon and the model's non-linear half.

`EnclaveClient` loads its half of the model (config, norms, RoPE) from its own copy of the checkpoint,
owns the transport (and so the rings) and the perf log; as a context manager it opens the session
(Hello: the daemon must serve the same model, by digest; rings sized for the model; Init) and always
tears it down. Nothing the enclave computes with comes from the host.
"""
from __future__ import annotations

import os

import torch

from .. import settings
from ..model.calls import score_width_step
from ..model.checkpoint import ModelSource, load_enclave_part, resolve_model
from ..model.config import LlamaConfig
from ..errors import ModelError
from .llama import CALL_SETS, KV_PLACEMENTS, EnclaveModel
from .ops import RemoteOps
from .sizing import ring_bytes_for
from ..tools.perflog import PerfLog
from ..wire.peer import client_info
from ..wire.registry import client_transport

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EnclaveClient:
    def __init__(self, *, endpoint: str, model: str | ModelSource = "tiny", transport: str = "shm", wire_dtype: str = "float32",
                 kv_cache: str = "daemon", timeout: float | None = None, log_path: str | None = None,
                 prompt_tokens: int = 1, total_tokens: int = 1, ring_mib: float | None = None,
                 enclave: bool = False, run_info: dict | None = None, calls: str = "fewest",
                 doorbell: str | None = None):
        if wire_dtype not in WIRE_DTYPES:
            raise ModelError(f"--wire-dtype {wire_dtype!r}: expected one of {list(WIRE_DTYPES)}")
        if kv_cache not in KV_PLACEMENTS:
            raise ModelError(f"--kv-cache {kv_cache!r}: expected one of {KV_PLACEMENTS}")
        self.endpoint = endpoint
        self.transport_name = transport
        self.doorbell = doorbell  # None: the transport's own default
        self.wire_name = wire_dtype
        self.wire = WIRE_DTYPES[wire_dtype]
        self.kv_cache = kv_cache
        if calls not in CALL_SETS:
            raise ModelError(f"--calls {calls!r}: expected one of {CALL_SETS}")
        self.calls = calls
        self.timeout = timeout if timeout is not None else settings.default_timeout()
        self.log_path = log_path
        self.prompt_tokens = prompt_tokens
        self.total_tokens = total_tokens
        self.ring_mib = ring_mib
        self.enclave = enclave
        self.run_info = run_info or {}
        self.source = model if isinstance(model, ModelSource) else resolve_model(model)
        self.part = load_enclave_part(self.source)
        self.transport = None
        self.perflog: PerfLog | None = None
        self.server_info: dict = {}
        self.cfg: LlamaConfig | None = None
        self.model: EnclaveModel | None = None

    def __enter__(self) -> "EnclaveClient":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        # Everything the enclave decides alone comes first: its model, the run's length, the rings' size.
        self.cfg = self.part.cfg
        if self.total_tokens > self.cfg.max_position_embeddings:
            raise ModelError(f"prompt plus new tokens = {self.total_tokens} positions, but the model allows "
                             f"{self.cfg.max_position_embeddings}")
        ring = int(self.ring_mib * 2**20) if self.ring_mib else ring_bytes_for(
            self.part, self.prompt_tokens, self.total_tokens, self.wire, self.kv_cache, calls=self.calls)
        self.transport = client_transport(self.transport_name, self.endpoint, timeout=self.timeout,
                                          enclave=self.enclave, max_reply_bytes=ring, doorbell=self.doorbell)
        info = self.transport.hello({**client_info(), "wire_dtype": self.wire_name})
        self.server_info = info
        if info.get("digest") != self.part.digest:
            raise ModelError(f"the daemon at {self.endpoint} serves another model than this client's "
                             f"{self.source.spec!r} (digest {str(info.get('digest'))[:12]!r}, ours "
                             f"{self.part.digest[:12]!r}): start both with the same --model, --layers and --seed")
        self.transport.open_session(ring)  # shm: creates the rings; msgpack: bounds each reply's size
        if self.log_path:
            self.perflog = PerfLog(self.log_path, self.transport.label, {
                "transport": self.transport_name, "doorbell": self.transport.doorbell, "endpoint": self.endpoint,
                "wire_dtype": self.wire_name,
                "kv_cache": self.kv_cache, "calls": self.calls, "model": info.get("model"), "device": info.get("device"),
                "daemon_dtype": info.get("dtype"), "ring_bytes": ring if self.transport.ring_bytes else 0,
                "versions": {"torch": torch.__version__, "shmrt": _version()}, "client_pid": os.getpid(),
                **self.run_info})
            self.transport.observers.append(self.perflog)
        self.transport.call("Init").release()
        ops = RemoteOps(self.transport, self.cfg, self.wire)
        # How wide a decode step's scores travel: the daemon's hint, bounded (model/calls.py); it changes message
        # sizes only, never a value we compute. Only shm's rings give a daemon the fixed addresses its graphs need.
        step = score_width_step(info.get("score_width_step")) if self.transport_name == "shm" else 1
        self.model = EnclaveModel(self.part, ops, self.kv_cache, self.calls, score_step=step)

    def close(self) -> None:
        if self.perflog is not None:
            self.perflog.close()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("shmrt")
    except Exception:
        return "dev"

