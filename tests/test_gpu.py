"""The daemon on CUDA (registered ring, DMA): same parity as on the CPU. Skipped without a GPU."""
import pytest
import torch

from conftest import check_close, random_ids
from test_split import run_client

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("transport", ["shm", "msgpack"])
def test_cuda_daemon_fp32_parity(checkpoints, model_daemon, transport):
    path, hf = checkpoints["gqa-tied-llama3"]
    d = model_daemon(str(path), "--device", "cuda")
    ids = random_ids(48, 320, seed=21)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    # TF32 would loosen float32 matmuls on the GPU; the daemon leaves it off (torch's default).
    check_close(f"cuda/{transport}/fp32", run_client(d.endpoint, transport, ids).prefill_logits, ref, 1e-4)


@pytest.mark.parametrize("kv", ["client", "daemon"])
def test_cuda_daemon_greedy_tokens(checkpoints, model_daemon, kv):
    path, hf = checkpoints["sharded-gqa"]
    d = model_daemon(str(path), "--device", "cuda")
    ids = random_ids(24, 320, seed=22)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 24:].tolist()
    assert run_client(d.endpoint, "shm", ids, kv=kv, new=8).tokens == ref
