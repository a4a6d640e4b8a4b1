"""The bench's floor (host/inprocess.py): the enclave model driving the daemon's handler in one process through the
same rings, against transformers, with rings small enough to wrap and poisoned released memory (conftest)."""
import pytest
import torch

from conftest import random_ids, shm_segments
from shmrt.enclave.generate import Sampler, generate
from shmrt.enclave.llama import EnclaveModel
from shmrt.enclave.ops import RemoteOps
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.inprocess import InProcessCaller
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import load_enclave_part


@pytest.mark.parametrize("kv_cache,calls,step", [("daemon", "fewest", 8), ("daemon", "v2.4", 1), ("client", "fused", 1)])
def test_the_floors_in_process_calls_give_transformers_tokens_through_wrapping_rings(checkpoints, kv_cache, calls,
                                                                                     step):
    path, hf = checkpoints["gqa-tied-llama3"]
    w = load_weights(str(path))
    handler = ModelHandler(LinearCompute(w, "cpu", torch.float32), "test", "", log=lambda m: None)
    ids = random_ids(20, 320, seed=2)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 20:].tolist()
    before = shm_segments()
    ring = 64 << 10   # a prefill's request is ~10 KiB here: the rings wrap many times in 8 steps
    with InProcessCaller(handler, torch.float32, ring) as caller:
        assert len(shm_segments() - before) == 2
        model = EnclaveModel(load_enclave_part(w.source), RemoteOps(caller, w.cfg, torch.float32), kv_cache, calls,
                             score_step=step)
        got = generate(model, ids, 8, Sampler()).tokens
        wrapped = caller.req.producer.head > caller.req.capacity and caller.rsp.producer.head > caller.rsp.capacity
    assert got == ref
    assert wrapped
    assert shm_segments() == before   # both rings unlinked at close
