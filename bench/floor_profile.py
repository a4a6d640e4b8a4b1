"""The in-process floor (bench e2e's measure_floor: the split's own ops without the transport) of a decode under
torch.profiler: the GPU's kernel time per token against the wall's, and the top ops by CUDA and by CPU time.

    DEV=cuda MODEL=llama3.2-1b PYTHONPATH=. python bench/floor_profile.py 16      # decode tokens profiled

Session 14 on an H200 (bench/results/h200-llama3.2-1b-session14/floor-profile-f900981.txt): the kernels were 2.5 ms
of a ~15 ms token, and torch's CPU argmax 333 us of it."""
import os
import sys
import time

import torch
from torch.profiler import profile, ProfilerActivity
from shmrt.enclave.generate import Sampler, decode_n, intra_op_threads, prefill
from shmrt.enclave.llama import EnclaveModel
from shmrt.enclave.ops import RemoteOps
from shmrt.enclave.sizing import ring_bytes_for
from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import ModelHandler
from shmrt.host.inprocess import InProcessCaller
from shmrt.host.weights import load_weights
from shmrt.model.calls import score_width_step
from shmrt.model.checkpoint import load_enclave_part

DEV = os.environ.get("DEV", "cuda")
MODEL = os.environ.get("MODEL", "llama3.2-1b")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
w = load_weights(MODEL, dtype=torch.float32, device=DEV)
handler = ModelHandler(LinearCompute(w, DEV, torch.float32), MODEL, "", log=lambda m: None)
part = load_enclave_part(w.source)
ids = torch.randint(0, w.cfg.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(1024))
ring = ring_bytes_for(part, 1024, 1024 + 64 + n, torch.float32, "daemon", calls="fewest")
with InProcessCaller(handler, torch.float32, ring) as caller, torch.inference_mode():
    m = EnclaveModel(part, RemoteOps(caller, w.cfg, torch.float32), "daemon", "fewest",
                     score_step=score_width_step(handler.hello().get("score_width_step")))
    for r in range(2):   # warm-up rounds, unprofiled
        with intra_op_threads(1):
            t0 = time.perf_counter()
            logits = prefill(m, ids)
            decode_n(m, logits, n + 1, Sampler())
        print(f"plain round {r}: prefill + decode {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    logits = prefill(m, ids)
    with intra_op_threads(1):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode_n(m, logits, n + 1, Sampler())
        dt = time.perf_counter() - t0
    print(f"profiled decode only: {dt / n * 1e3:.2f} ms/token (profiler on; {n} tokens)")
ka = prof.key_averages()
cuda_total = sum(e.self_device_time_total for e in ka) / 1e3 / n
print(f"total self CUDA time in the profiled decode, per token: {cuda_total:.1f} ms")
print(ka.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
print(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
