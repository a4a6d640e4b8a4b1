"""Zero-copy lifetimes, tested the way they fail: a daemon whose K/V cache aliases the request ring (the
round-1 bug, re-introduced on purpose in a real daemon process) is caught by poison mode with rings
small enough to wrap, and the shipped daemon gives transformers' tokens under the same conditions."""
import subprocess
import sys
import time

import pytest
import torch

from conftest import random_ids, repo_root
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import decode_one, prefill
from shmrt.errors import PeerError, ProtocolError

# The bug: the K/V cache holds request memory instead of an owned copy. Round 1 kept the view itself (on a
# CPU daemon `.to(device)` is a no-op); here the store adopts a prefill's rows as the layer's buffer. Only K's
# rows of the `fused` call set come from the request (Matmul QK^T); with `fewest` the daemon computes K and V
# itself and no cache row was ever request memory, so these runs use `fused`.
ALIASING_DAEMON = """
import sys
import shmrt.host.compute as compute
append = compute.KVStore.append
def adopt(self, layer, which, rows, pos, width=0):  # at pos 0 the request's rows become the layer's buffer
    if pos:
        return append(self, layer, which, rows, pos, width)
    self.place(layer, which, tuple(rows.shape), pos, width)
    self.buffers[which][layer] = rows
    return rows
compute.KVStore.append = adopt
from shmrt.cli import main
sys.exit(main(["daemon", *sys.argv[1:]]))
"""


def start_daemon(tmp_path, model_path, *, aliasing: bool, poison: bool):
    endpoint = f"ipc://{tmp_path}/{'alias' if aliasing else 'ok'}-{int(poison)}.sock"
    ready = tmp_path / f"ready-{aliasing}-{poison}"
    argv = ["--model", str(model_path), "--endpoint", endpoint, "--ready-file", str(ready), "--quiet"]
    cmd = [sys.executable, "-c", ALIASING_DAEMON, *argv] if aliasing else [sys.executable, "-m", "shmrt", "daemon", *argv]
    env = {**__import__("os").environ, "SHMRT_POISON": "1" if poison else "0"}
    proc = subprocess.Popen(cmd, env=env, cwd=repo_root())
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    return proc, endpoint


def greedy(endpoint, model, ids, new, ring_mib=1 / 16, calls="fused"):
    """Greedy tokens and the logits [new, V] that chose them (prefill, then a decode step per token)."""
    with EnclaveClient(endpoint=endpoint, model=str(model), transport="shm", kv_cache="daemon", timeout=30, ring_mib=ring_mib,
                       prompt_tokens=ids.shape[1], total_tokens=ids.shape[1] + new, calls=calls) as c:
        with torch.inference_mode():
            logits = [prefill(c.model, ids)]
            for _ in range(new - 1):
                logits.append(decode_one(c.model, logits[-1].argmax(-1)))
    logits = torch.cat(logits)
    return logits.argmax(-1).tolist(), logits


@pytest.fixture
def reference(checkpoints):
    """The prompt, transformers' greedy tokens and the logits that chose them (the sequence fed whole)."""
    path, hf = checkpoints["sharded-gqa"]
    ids = random_ids(24, 320, seed=21)
    with torch.no_grad():
        tokens = hf.generate(ids, max_new_tokens=8, do_sample=False)
        logits = hf(tokens[:, :-1]).logits[0, 23:].float()
    return path, ids, tokens[0, 24:].tolist(), logits


@pytest.mark.parametrize("aliasing,poison", [(False, True), (True, True), (True, False)])
def test_poison_catches_a_kv_cache_that_aliases_the_ring(tmp_path, reference, aliasing, poison):
    path, ids, ref, ref_logits = reference
    proc, endpoint = start_daemon(tmp_path, path, aliasing=aliasing, poison=poison)
    try:
        if not aliasing:   # the shipped daemon: right, poisoned, with the default calls and the ones above
            for calls in ("fewest", "fused"):
                tokens, logits = greedy(endpoint, path, ids, 8, calls=calls)
                assert tokens == ref and torch.allclose(logits, ref_logits, rtol=0, atol=1e-4), calls
        elif poison:
            # The cache aliases released, poisoned ring space: the next step reads NaN and stops loudly.
            with pytest.raises((ProtocolError, PeerError), match="non-finite|out of range"):
                greedy(endpoint, path, ids, 8)
        else:
            # Without poison the same bug is silent: no error, plausible but wrong numbers (what shipped in
            # round 1; there the wrong tokens showed too, V's rows then travelling through the ring as well).
            _, logits = greedy(endpoint, path, ids, 8)
            assert torch.isfinite(logits).all() and (logits - ref_logits).abs().max() > 1e-2
    finally:
        proc.terminate()
        proc.wait(10)
