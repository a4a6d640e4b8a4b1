"""Fixtures: real daemon processes on real sockets, tracked and torn down with a timeout."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pathlib
import secrets
import sys
import time

import pytest

from shmrt import settings

# The CLI's process defaults, before torch loads (as `shmrt` sets them), for this process and every child: OpenMP
# workers that sleep between ops. Without them, on 2 cores, an echo daemon's workers spun after a parallel copy
# and its client saw a 513 KB reply 2-5 ms late (bench/results/cpu-2core-session17).
settings.apply_process_defaults()

from shmrt.tools.process import DaemonProcess  # noqa: E402

# Child processes the tests start from Python (echo daemons, concurrent clients, scribblers) come from a
# fork server that imported torch and shmrt once: a spawned child spent ~3 s of CPU importing torch
# before its first line, ~17 echo daemons and ~15 clients per run. Each child is still its own process,
# forked from a server that has only imported (no torch op run, so no thread pool to inherit), and it
# re-imports the test module that defines its target, as a spawned child did.
CHILDREN = mp.get_context("forkserver")
CHILDREN.set_forkserver_preload(["numpy", "torch", "zmq", "shmrt.host.server", "shmrt.host.daemon",
                                 "shmrt.enclave.client", "shmrt.enclave.generate", "shmrt.wire.registry"])

# Every test runs with poisoned ring memory (released space overwritten with 0xFF, NaN as a float):
# a view kept past its scope reads NaN and fails loudly. Daemons started by the tests inherit it.
os.environ.setdefault("SHMRT_POISON", "1")


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("shmrt-")}


def _ours_or_orphaned(name: str) -> bool:
    """Created by this test process or by one of its children that is gone: never a segment of another
    live process (a second test run, a user's session) that shares /dev/shm. Unreadable headers count."""
    from shmrt.tools.cleanup import segment_owner
    from shmrt.wire.peer import process_alive
    owner = segment_owner("/" + name)
    return owner is None or owner[0] == os.getpid() or not process_alive(owner[0])


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    before = shm_segments()
    yield
    time.sleep(0.2)
    leaked = {name for name in shm_segments() - before if _ours_or_orphaned(name)}
    for name in leaked:  # clean up so one failure does not poison later runs, then fail loudly
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
    assert not leaked, f"tests leaked shared-memory segments: {sorted(leaked)}"


@pytest.fixture
def endpoint(tmp_path) -> str:
    return f"ipc://{tmp_path}/d-{secrets.token_hex(4)}.sock"


def _serve_echo(endpoint: str, session_timeout: float) -> None:
    from shmrt.host.server import EchoHandler, Server
    with Server(endpoint, EchoHandler(), session_timeout=session_timeout, log=lambda m: None) as server:
        server.serve()


class EchoDaemon:
    def __init__(self, endpoint: str, session_timeout: float = 120.0):
        self.endpoint = endpoint
        self.proc = CHILDREN.Process(target=_serve_echo, args=(endpoint, session_timeout), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


@pytest.fixture
def echo_daemon(endpoint):
    d = EchoDaemon(endpoint)
    yield d
    d.stop()


@pytest.fixture
def threaded_echo(endpoint):
    """An echo server in a thread of this process (it sees the registry as a test changed it) -> (endpoint, the
    list its log lines go to)."""
    import threading
    from shmrt.host.server import EchoHandler, Server
    logs, ready, stop = [], threading.Event(), threading.Event()

    def serve():
        with Server(endpoint, EchoHandler(), log=logs.append) as server:
            ready.set()
            server.serve(until=stop.is_set, poll_ms=20)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "server did not start"
    yield endpoint, logs
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


class DaemonPool:
    """`shmrt daemon` processes started for some tests and stopped together: `start` makes a new one each
    call, `shared` one per argument list (for tests that each open their own session and only read the
    weights). `stop` terminates them all at once, then reaps them (each takes a second or so to exit)."""

    def __init__(self, directory):
        self._directory = directory   # () -> a folder for the sockets
        self._started: list[DaemonProcess] = []
        self._shared: dict[tuple, DaemonProcess] = {}

    def start(self, model: str = "tiny", *extra: str, endpoint: str | None = None) -> DaemonProcess:
        ep = endpoint or f"ipc://{self._directory()}/m-{secrets.token_hex(4)}.sock"
        d = DaemonProcess(["--model", model, *extra], ep, timeout=120, quiet=True)
        self._started.append(d)
        return d

    def shared(self, model: str = "tiny", *extra: str) -> DaemonProcess:
        key = (model, *extra)
        if key not in self._shared:
            self._shared[key] = self.start(model, *extra)
        return self._shared[key]

    def stop(self) -> None:
        for d in self._started:
            if d.proc.poll() is None:
                d.proc.terminate()
        for d in self._started:
            d.stop()


@pytest.fixture
def model_daemon(tmp_path):
    """Factory: start `shmrt daemon` on a model; stopped at teardown."""
    pool = DaemonPool(lambda: tmp_path)
    yield pool.start
    pool.stop()


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory):
    """A DaemonPool that lives as long as the test module: start-up is ~3 s a daemon on 2 cores."""
    pool = DaemonPool(lambda: tmp_path_factory.mktemp("daemons"))
    yield pool
    pool.stop()


def shmrt_argv(*args) -> list[str]:
    """`python -m shmrt ARGS`, on the tiny preset unless ARGS name a model (the real default, SmolLM2,
    takes ~20 s to start on 2 cores: the tests that want it say so)."""
    args = list(args)
    if args and args[0] in ("run", "client", "daemon") and "--model" not in args:
        args[1:1] = ["--model", "tiny"]
    return [sys.executable, "-m", "shmrt", *args]


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}, /dev/shm free: {os.statvfs('/dev/shm').f_bavail * os.statvfs('/dev/shm').f_frsize >> 20} MiB"


def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


# ---- small HuggingFace checkpoints written by transformers itself (random weights)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def write_checkpoint(path: pathlib.Path, *, tie: bool, scaling: dict | None, kv_heads: int = 2,
                     layers: int = 4, legacy_config: bool = False, shard: str | None = None, seed: int = 0):
    import json
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    rope = dict(scaling or {"rope_type": "default"}, rope_theta=500000.0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=tie, rope_parameters=rope, rms_norm_eps=1e-5, initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a norm bug shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if legacy_config:  # rewrite config.json the way transformers 4.x wrote it
        cfg_path = path / "config.json"
        d = json.loads(cfg_path.read_text())
        params = d.pop("rope_parameters")
        d["rope_theta"] = params.pop("rope_theta")
        d["rope_scaling"] = params if params.get("rope_type") != "default" else None
        cfg_path.write_text(json.dumps(d))
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (path, transformers model) for the configurations the parity tests cover."""
    specs = {
        "gqa-tied-llama3": dict(tie=True, scaling=LLAMA3_SCALING),
        "untied-mha-legacy": dict(tie=False, scaling=None, kv_heads=4, legacy_config=True),
        "sharded-gqa": dict(tie=False, scaling=LLAMA3_SCALING, shard="100KB", seed=3),
    }
    out = {}
    for name, spec in specs.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, write_checkpoint(path, **spec))
    return out


class DaemonStarting:
    """`shmrt daemon ARGS` started on a thread: the caller goes on while it loads; `get()` waits for it."""

    def __init__(self, args: list[str], endpoint: str, timeout: float):
        import threading
        self._box: dict = {}
        self._thread = threading.Thread(target=self._start, args=(args, endpoint, timeout), daemon=True)
        self._thread.start()

    def _start(self, args, endpoint, timeout) -> None:
        try:
            self._box["daemon"] = DaemonProcess(args, endpoint, timeout=timeout, quiet=True)
        except BaseException as exc:  # noqa: BLE001 - raised by get(), in the test that needs it
            self._box["error"] = exc

    def get(self) -> DaemonProcess:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["daemon"]

    def stop(self) -> None:
        self._thread.join()
        if "daemon" in self._box:
            self._box["daemon"].stop()


@pytest.fixture(scope="session")
def smollm2_daemon(tmp_path_factory):
    """`shmrt daemon --model smollm2-135m` for test_real_model, which only reads its weights (every test
    its own session). Started in the background by smollm2_hf, below: the two loads of SmolLM2 (~10 s in
    the daemon, ~25 s in transformers, a core each) overlap instead of following each other."""
    from shmrt.model.checkpoint import SMOLLM2
    starting = DaemonStarting(["--model", SMOLLM2], f"ipc://{tmp_path_factory.mktemp('smollm2')}/d.sock", 300)
    yield starting
    starting.stop()


@pytest.fixture(scope="session")
def smollm2_hf(request):
    """transformers' LlamaForCausalLM loading the installed SmolLM2 GGUF itself (~30 s on 2 cores: once)."""
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (scripts/setup.sh installs it)")
    if any(item.path.name == "test_real_model.py" for item in request.session.items):
        request.getfixturevalue("smollm2_daemon")  # starts loading beside this load (see there)
    from shmrt.errors import ModelError
    from shmrt.model.gguf_checkpoint import find_smollm2
    try:
        path = find_smollm2()
    except ModelError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM
    import torch
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def random_ids(n: int, vocab: int, seed: int):
    import torch
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    assert len(set(ids[0].tolist())) > n // 2, "ids must not be (nearly) identical: that hides a missing mask"
    return ids


def check_close(name: str, got, ref, rel: float) -> float:
    """llm.c-style check_tensor: report the max difference relative to the reference's scale."""
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"{name}: max|diff| {diff:.3e}, max|ref| {scale:.3e}, ratio {diff / scale:.3e} (limit {rel:.0e})")
    assert diff <= rel * scale, f"{name}: max|diff| {diff} > {rel} x {scale}"
    return diff
