"""The enclave side: a session with the daemon and the model's non-linear half.

`EnclaveClient` owns the transport (and so the rings) and the perf log; as a context manager it
opens the session (Hello, rings sized for the model, Init) and always tears it down.
"""
from __future__ import annotations

import os

import torch

from .. import settings
from ..model.config import LlamaConfig
from ..errors import ModelError, ProtocolError, describe
from .llama import KV_PLACEMENTS, EnclaveModel
from .ops import RemoteOps
from ..tools.perflog import PerfLog
from ..wire.ring import LARGE_ALIGN
from ..wire.peer import client_info
from ..wire.transport import make_client_transport, transport_label
from ..wire.untrusted import load_json
from ..model.config import projection_rows

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ring_bytes_for(cfg: LlamaConfig, prompt_tokens: int, total_tokens: int, wire: torch.dtype, batch: int = 1) -> int:
    """A ring size that holds the largest message of this run twice over (any lap position)."""
    item = wire.itemsize
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    S, T = prompt_tokens, max(total_tokens, prompt_tokens)
    rows = projection_rows(cfg)
    candidates = [
        batch * H * S * S * item + batch * Hkv * T * hd * item,           # P and V (P*V, prefill)
        batch * H * 1 * T * item + 2 * batch * Hkv * T * hd * item,       # decode with client-side K/V
        batch * S * (rows["gate_proj"] + rows["up_proj"]) * item,         # gate|up reply
        batch * S * (rows["q_proj"] + 2 * rows["k_proj"]) * item,
        batch * cfg.vocab_size * 4,                                       # logits
        (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 4 + cfg.head_dim * 2,  # Init
    ]
    largest = max(candidates) + 8 * LARGE_ALIGN
    return max(2 * largest, 1 << 20)


class EnclaveClient:
    def __init__(self, *, endpoint: str, transport: str = "shm", wire_dtype: str = "float32",
                 kv_cache: str = "daemon", timeout: float | None = None, log_path: str | None = None,
                 prompt_tokens: int = 1, total_tokens: int = 1, ring_mib: float | None = None,
                 enclave: bool = False, run_info: dict | None = None):
        if wire_dtype not in WIRE_DTYPES:
            raise ModelError(f"--wire-dtype {wire_dtype!r}: expected one of {list(WIRE_DTYPES)}")
        if kv_cache not in KV_PLACEMENTS:
            raise ModelError(f"--kv-cache {kv_cache!r}: expected one of {KV_PLACEMENTS}")
        self.endpoint = endpoint
        self.transport_name = transport
        self.wire_name = wire_dtype
        self.wire = WIRE_DTYPES[wire_dtype]
        self.kv_cache = kv_cache
        self.timeout = timeout if timeout is not None else settings.default_timeout()
        self.log_path = log_path
        self.prompt_tokens = prompt_tokens
        self.total_tokens = total_tokens
        self.ring_mib = ring_mib
        self.enclave = enclave
        self.run_info = run_info or {}
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
        self.transport = make_client_transport(self.transport_name, self.endpoint, timeout=self.timeout,
                                               enclave=self.enclave)
        info = self.transport.hello({**client_info(), "wire_dtype": self.wire_name})
        if not isinstance(info.get("config"), dict):
            raise ProtocolError("Hello reply carries no model config: is that a shmrt model daemon?")
        self.server_info = info
        self.cfg = LlamaConfig.from_dict(info["config"])
        if self.total_tokens > self.cfg.max_position_embeddings:
            raise ModelError(f"prompt plus new tokens = {self.total_tokens} positions, but the model allows "
                             f"{self.cfg.max_position_embeddings}")
        ring = int(self.ring_mib * 2**20) if self.ring_mib else ring_bytes_for(
            self.cfg, self.prompt_tokens, self.total_tokens, self.wire)
        self.transport.open_session(ring)  # shm: creates the rings; msgpack: bounds each reply's size
        if self.log_path:
            self.perflog = PerfLog(self.log_path, transport_label(self.transport_name, self.endpoint), {
                "transport": self.transport_name, "endpoint": self.endpoint, "wire_dtype": self.wire_name,
                "kv_cache": self.kv_cache, "model": info.get("model"), "device": info.get("device"),
                "daemon_dtype": info.get("dtype"), "ring_bytes": ring if self.transport_name == "shm" else 0,
                "versions": {"torch": torch.__version__, "shmrt": _version()}, "client_pid": os.getpid(),
                **self.run_info})
            self.transport.observers.append(self.perflog)
        with self.transport.call("Init") as reply:
            if len(reply.tensors) != 2:
                raise ProtocolError(f"Init reply has {len(reply.tensors)} tensors, expected norms and inv_freq")
            norms, inv_freq = (t.float().clone() for t in reply.tensors)
            init_info = load_json(reply.text or "{}", "Init reply text")
            scaling = init_info.get("attention_scaling", 1.0) if isinstance(init_info, dict) else None
            if type(scaling) not in (int, float) or not 0 < scaling <= 16:  # load_json: never NaN/inf
                raise ProtocolError(f"Init reply attention_scaling {describe(scaling)}, expected a number in (0, 16]")
            scaling = float(scaling)
        cfg = self.cfg
        if tuple(norms.shape) != (2 * cfg.num_hidden_layers + 1, cfg.hidden_size) or \
                tuple(inv_freq.shape) != (cfg.head_dim // 2,):
            raise ProtocolError(f"Init tensors {tuple(norms.shape)} / {tuple(inv_freq.shape)} do not fit the config")
        ops = RemoteOps(self.transport, cfg, self.wire)
        self.model = EnclaveModel(cfg, norms, inv_freq, scaling, ops, self.kv_cache)

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.cfg.vocab_size
        if ids.numel() == 0:
            raise ModelError("the prompt is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ModelError(f"token ids must lie in [0, {vocab}); got min {int(ids.min())}, max {int(ids.max())}")
        return ids

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

