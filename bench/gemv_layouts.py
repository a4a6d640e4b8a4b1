"""A decode step's fp32 products (one row against each weight of llama3.2-1b's shape) on a GPU, in several layouts and
calls, each replayed as a CUDA graph 200 times back to back (CUDA events): us a product and the weight bytes read per
second. Run on a CUDA host: `python bench/gemv_layouts.py`. Session 14 on an H200: gemv-layouts.txt in its results."""
import torch
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
shapes = {"gate|up": (16384, 2048), "down": (2048, 8192), "qkv": (3072, 2048), "o_proj": (2048, 2048), "lm_head": (128256, 2048)}
def timed(fn, reps=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps
for name, (out, inp) in shapes.items():
    W = torch.randn(out, inp, device=dev) / inp ** 0.5
    Wt = W.t().contiguous()
    x = torch.randn(1, 1, inp, device=dev)
    y = torch.empty(1, 1, out, device=dev)
    ref = torch.nn.functional.linear(x, W)
    variants = {
        "F.linear(x, W)": lambda: torch.nn.functional.linear(x, W),
        "x @ Wt (W^T stored)": lambda: torch.matmul(x, Wt),
        "mv(W, x)": lambda: torch.mv(W, x.view(-1)),
        "mm(x2, Wt)": lambda: torch.mm(x.view(1, -1), Wt),
        "linear out=": lambda: torch.matmul(x, W.t(), out=y),
    }
    if out >= 8192:
        k = 4
        Ws = list(W.split(out // k))
        variants[f"{k} linear chunks"] = lambda: [torch.nn.functional.linear(x, w) for w in Ws]
    nbytes = W.numel() * 4
    for vname, fn in variants.items():
        try:
            us = timed(fn)
            got = fn()
            got = torch.cat(got, -1) if isinstance(got, list) else got
            err = (got.view(-1) - ref.view(-1)).abs().max().item()
            print(f"{name:8s} {vname:22s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s  maxdiff {err:.1e}", flush=True)
        except Exception as e:
            print(f"{name:8s} {vname:22s} failed: {type(e).__name__}: {str(e)[:80]}")
