"""The split over real processes: `shmrt daemon` + the enclave client, both transports, vs transformers."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import check_close, random_ids, shmrt_argv
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import Sampler, generate

TRANSPORTS = ["shm", "msgpack"]
# The daemon on CUDA (registered ring, DMA) must give the same parity; skipped where there is no GPU.
# TF32 would loosen float32 matmuls on the GPU; the daemon leaves it off (torch's default).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


# Rings far smaller than a forward's traffic, so they wrap several times per forward: with poison on
# (conftest), any view kept past its scope on either side reads NaN and the test fails.
SMALL_RING_MIB = 0.125


def run_client(endpoint, transport, ids, *, model="tiny", wire="float32", kv="daemon", new=0, log=None, min_wraps=3,
               ring_mib=SMALL_RING_MIB):
    calls = []
    ring_mib = ring_mib / (2 if wire == "bfloat16" else 1)  # half the bytes: half the ring
    with EnclaveClient(endpoint=endpoint, model=str(model), transport=transport, wire_dtype=wire, kv_cache=kv, timeout=30,
                       prompt_tokens=ids.shape[1], total_tokens=ids.shape[1] + new, log_path=log,
                       ring_mib=ring_mib) as c:
        c.transport.observers.append(calls.append)
        with torch.inference_mode():
            result = generate(c.model, ids, new, Sampler())
    if transport == "shm":
        wraps = sum(s.payload_sent for s in calls) / (ring_mib * 2**20)
        print(f"request ring wrapped {wraps:.1f} times over {len(calls)} calls")
        assert wraps >= min_wraps
    return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["gqa-tied-llama3", "untied-mha-legacy"])
def test_fp32_wire_logits_match_transformers(checkpoints, module_daemons, transport, name, device):
    path, hf = checkpoints[name]
    d = module_daemons.shared(str(path), "--device", device)
    ids = random_ids(48, 320, seed=11)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    got = run_client(d.endpoint, transport, ids, model=path).prefill_logits
    check_close(f"{name}/{transport}/{device}/fp32", got, ref, 1e-4)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bf16_wire_same_argmax_and_close(checkpoints, module_daemons, transport):
    path, hf = checkpoints["gqa-tied-llama3"]
    d = module_daemons.shared(str(path), "--device", "cpu")
    ids = random_ids(48, 320, seed=12)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    got = run_client(d.endpoint, transport, ids, model=path, wire="bfloat16").prefill_logits
    check_close(f"{transport}/bf16", got, ref, 2e-2)
    assert int(got.argmax()) == int(ref.argmax())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kv", ["client", "daemon"])
def test_prefill_then_8_greedy_tokens_equal_transformers_generate(checkpoints, module_daemons, transport, kv, device):
    path, hf = checkpoints["sharded-gqa"]
    d = module_daemons.shared(str(path), "--device", device)
    ids = random_ids(24, 320, seed=13)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 24:].tolist()
    # 24 tokens: a 64 KiB ring holds the largest message (gate|up, 30 KiB) twice and wraps 4-7 times
    assert run_client(d.endpoint, transport, ids, model=path, kv=kv, new=8, ring_mib=1 / 16).tokens == ref


def shmrt(*args, timeout=120):
    return subprocess.run(shmrt_argv(*args), capture_output=True, text=True, timeout=timeout)


def test_cli_run_token_ids_logits_out_matches_transformers(checkpoints, tmp_path):
    path, hf = checkpoints["gqa-tied-llama3"]
    ids = random_ids(30, 320, seed=14)
    out = tmp_path / "logits.npy"
    r = shmrt("run", "--model", str(path), "--token-ids", ",".join(map(str, ids[0].tolist())),
              "--max-new-tokens", "0", "--logits-out", str(out), "--log", str(tmp_path / "run.log"), "--quiet")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
    check_close("cli logits", torch.from_numpy(np.load(out)), ref, 1e-4)


def test_cli_run_default_is_smollm2_over_shm_answering_in_text(tmp_path):
    """The main job of a fresh checkout: no flags, the real model, a real question, a real answer."""
    r = subprocess.run([sys.executable, "-m", "shmrt", "run"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m on cpu" in r.stdout and "transport shm" in r.stdout
    assert "text: 'The capital of France is Paris.'" in r.stdout
    assert "tokens/s" in r.stdout and "transport" in r.stdout
    assert (tmp_path / "zmq_performance.log").exists() and (tmp_path / "zmq_performance.log.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "neither a model name"),
    (["--model", "gigantic"], "neither a model name"),
    (["--token-ids", "1,2,99999"], "token ids must lie in [0, 512)"),
    (["--prefill", "3000"], "exceeds the model's 2048 positions"),
])
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path):
    r = shmrt("run", *args, "--log", str(tmp_path / "x.log"))
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("daemon_args", [("tiny", "--seed", "1"), ("tiny", "--layers", "1")])
def test_a_daemon_serving_another_model_is_refused_at_hello(model_daemon, daemon_args):
    """The enclave computes with its own copy of the model; a daemon with different weights is refused."""
    d = model_daemon(*daemon_args)
    r = shmrt("client", "--model", "tiny", "--endpoint", d.endpoint, "--prefill", "4", "--log", "", "--timeout", "10")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "serves another model" in r.stderr and "same --model, --layers and --seed" in r.stderr, r.stderr


def test_client_without_daemon_fails_within_timeout_naming_endpoint(tmp_path):
    ep = f"ipc://{tmp_path}/nobody.sock"
    r = shmrt("client", "--endpoint", ep, "--timeout", "1", "--log", "")
    assert r.returncode == 2 and ep in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("calls", ["fused", "fewest"])
def test_shm_activations_are_written_into_the_ring_once(model_daemon, calls):
    """Every BatchLinear input and the QK^T operands (fewest: x and the RoPE tables) are produced in place in the
    request ring: no copy in."""
    d = model_daemon("tiny")
    log = []
    ids = random_ids(32, 512, seed=15)
    with EnclaveClient(endpoint=d.endpoint, transport="shm", timeout=30, prompt_tokens=32, total_tokens=32,
                       calls=calls) as c:
        c.transport.observers.append(log.append)
        with torch.inference_mode():
            generate(c.model, ids, 0, Sampler())
    linear = [s for s in log if s.method == "BatchLinear"]
    scores = [s for s in log if s.method == ("Matmul" if calls == "fused" else "AttentionScores")]
    assert len(linear) == 2 * (3 if calls == "fused" else 2) and all(s.copy_in_ns == 0 and s.payload_sent > 0
                                                                     for s in linear)
    assert len(scores) == 2 and all(s.copy_in_ns == 0 for s in scores)   # Q and new K rows (or x, tables), in place
    if calls == "fewest":   # x [1, 32, D] in the wire dtype and the tables [4, 32, hd] in float32
        assert all(s.payload_sent == 32 * (c.cfg.hidden_size + 4 * c.cfg.head_dim) * 4 for s in scores)
    # P*V + o_proj: P is written in place and is all it sends (V's rows stayed on the daemon at the projection)
    fused = [s for s in log if s.method == "AttentionOutput"]
    heads = c.cfg.num_attention_heads
    assert len(fused) == 2 and all(s.copy_in_ns == 0 and s.payload_sent == heads * 32 * 32 * 4 for s in fused)
