"""Rings sized by the model itself (a dry run on meta tensors) hold every real message twice over."""
import pytest
import torch

from conftest import random_ids
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import Sampler, generate
from shmrt.enclave.sizing import MIN_RING_BYTES, ring_bytes_for
from shmrt.model.checkpoint import load_enclave_part, resolve_model


@pytest.mark.parametrize("kv", ["daemon", "client"])
@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_dry_run_ring_holds_the_largest_real_message_twice(module_daemons, kv, wire):
    d = module_daemons.shared("small", "--layers", "2")   # each run its own session
    source = resolve_model("small", 2)
    prompt, new = 160, 6
    calls = []
    with EnclaveClient(endpoint=d.endpoint, model=source, transport="shm", wire_dtype=wire, kv_cache=kv,
                       timeout=60, prompt_tokens=prompt, total_tokens=prompt + new) as c:
        c.transport.observers.append(calls.append)
        ring = c.transport.req.capacity
        with torch.inference_mode():
            generate(c.model, random_ids(prompt, source.cfg.vocab_size, seed=3), new, Sampler())
    largest = max(max(s.payload_sent, s.payload_recv) for s in calls)
    expected = ring_bytes_for(load_enclave_part(source), prompt, prompt + new,
                              {"float32": torch.float32, "bfloat16": torch.bfloat16}[wire], kv)
    print(f"kv={kv} wire={wire}: largest message {largest} bytes, ring {ring} bytes")
    assert ring >= expected and ring >= 2 * largest
    assert expected > MIN_RING_BYTES and 2 * largest > 0.9 * (expected - 4 * 4096)   # sized to it, not padded


def test_client_side_kv_needs_a_bigger_ring_for_long_decodes():
    part = load_enclave_part(resolve_model("small"))
    short = ring_bytes_for(part, 8, 9, torch.float32, "client")
    long = ring_bytes_for(part, 8, 3000, torch.float32, "client")
    assert long > short        # the last decode step sends every cached K/V row
