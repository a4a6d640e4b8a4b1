"""Who should ring a CUDA daemon's reply doorbell: its CPU once the device is done (today: synchronize, then the
reply's seq word stored into the response ring's header), or the GPU itself, as the last copy of the call's graph
(an 8-byte copy of the seq word into that header, which is registered memory, after the reply's bytes)? With the
GPU ringing, the daemon's wake-up from the synchronize and its finish and post (~8-10 us of an H200 host's Python a
call, session 16) leave the client's critical path. Measured before anything is built:

A client process (CPU only) rings requests through a real shared-memory ring (the request ring's bell seq word,
an 8 KB row in its data area) and spins on the response ring's word; this process, the daemon, spins on the
request word and replays a decode-shaped graph: the row copied in, a 2048 x 2048 float32 product (2 I: the reply
is exactly 2x), the row copied out; in `gpu` mode two 8-byte copies more, the seq from a pinned word to the device
and from there into the response ring's header. Blocks of calls alternate between the modes. Per mode: the round
trip the client sees, and how often it saw the seq word before the reply's bytes (it poisons the reply with NaN
before each call and checks it against 2x after).

    PYTHONPATH=. python bench/gpu_bell_probe.py [calls (6000)] [block (500)]

Without CUDA it runs the same plumbing with the bodies on the CPU (no graphs): a check of the script, not a
measurement."""
import multiprocessing as mp
import statistics
import sys

from shmrt import settings

settings.apply_process_defaults()   # as the CLI does, before torch loads

import torch  # noqa: E402

from shmrt.host.daemon import HostRegistration  # noqa: E402
from shmrt.wire.native import Backoff, WordWaiter, now_ns, precise_sleeps  # noqa: E402
from shmrt.wire.ring import OFF_BELL_SEQ, Ring  # noqa: E402

D = 2048
CAPACITY = 1 << 20
STOP = 1 << 62
SPIN = Backoff(spin_us=1e6, yield_us=2e6)   # both sides spin through a call, as on a GPU host


def mode_of(seq: int, block: int) -> str:
    return "gpu" if ((seq - 1) // block) % 2 else "cpu"


def _wait_word(waiter: WordWaiter, alive=lambda: True) -> None:
    start = now_ns()
    while waiter.wait(now_ns() - start, 100_000_000) < 0:
        if not alive():
            raise RuntimeError("the other side is gone")


def client(req_name: str, rsp_name: str, calls: int, results) -> None:
    precise_sleeps()
    req, rsp = Ring.attach(req_name, CAPACITY), Ring.attach(rsp_name, CAPACITY)
    x_ring = req.tensor(0, D * 4, torch.float32, (D,))
    y_ring = rsp.tensor(0, D * 4, torch.float32, (D,))
    base = torch.randn(D, generator=torch.Generator().manual_seed(0))
    waiter = WordWaiter([rsp.native.word_address(OFF_BELL_SEQ)], SPIN)
    trips, early = [], []
    for seq in range(1, calls + 1):
        x = base.clone()
        x[0] = float(seq)
        x_ring.copy_(x)
        y_ring.fill_(float("nan"))
        start = now_ns()
        req.native.store(OFF_BELL_SEQ, seq)
        _wait_word(waiter)
        trips.append(now_ns() - start)
        seen = rsp.native.load(OFF_BELL_SEQ)
        waiter.seen[0] = seen
        early.append(seen != seq or not torch.equal(y_ring, 2 * x))
    req.native.store(OFF_BELL_SEQ, STOP)
    results.put((trips, early))
    req.close()
    rsp.close()


class Daemon:
    """The daemon's side: the rings (it creates them here; in shmrt the client does), registered for DMA, and the
    two replays."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.req, self.rsp = Ring.create(CAPACITY, "req"), Ring.create(CAPACITY, "rsp")
        dev = torch.device("cuda" if self.cuda else "cpu")
        self.registration = HostRegistration([self.req.native, self.rsp.native], print) if self.cuda else None
        assert self.registration is None or len(self.registration.pointers) == 2, "cudaHostRegister failed"
        self.w = (2 * torch.eye(D)).to(dev)
        self.x_ring = self.req.tensor(0, D * 4, torch.float32, (D,))
        self.y_ring = self.rsp.tensor(0, D * 4, torch.float32, (D,))
        self.xd, self.yd = torch.empty(D, device=dev), torch.empty(D, device=dev)
        self.seq_host = torch.zeros(1, dtype=torch.int64, pin_memory=self.cuda)
        self.seq_word = self.seq_host.numpy()
        self.seq_dev = torch.zeros(1, dtype=torch.int64, device=dev)
        # the response ring's bell seq word as a tensor over the (registered) mapping
        self.bell = torch.frombuffer(self.rsp._mm, dtype=torch.int64, count=1, offset=OFF_BELL_SEQ)
        self.replays = {"cpu": self._capture(self._body_cpu), "gpu": self._capture(self._body_gpu)}

    def _body_cpu(self) -> None:
        self.xd.copy_(self.x_ring, non_blocking=True)
        torch.mv(self.w, self.xd, out=self.yd)
        self.y_ring.copy_(self.yd, non_blocking=True)

    def _body_gpu(self) -> None:
        self._body_cpu()
        self.seq_dev.copy_(self.seq_host, non_blocking=True)
        self.bell.copy_(self.seq_dev, non_blocking=True)   # after the reply's bytes, in stream order

    def _capture(self, body):
        if not self.cuda:
            return body
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            body()   # warm-up outside the capture (the bell gets seq 0: what it holds already)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin()
            body()
            graph.capture_end()
        side.synchronize()
        return graph.replay

    def serve(self, block: int, alive) -> dict[str, list[int]]:
        """Answer requests until STOP: the daemon's own time a call (its replay and synchronize, and in cpu mode the
        store) by mode."""
        precise_sleeps()
        waiter = WordWaiter([self.req.native.word_address(OFF_BELL_SEQ)], SPIN)
        spent = {"cpu": [], "gpu": []}
        while True:
            _wait_word(waiter, alive)
            seq = self.req.native.load(OFF_BELL_SEQ)
            waiter.seen[0] = seq
            if seq == STOP:
                return spent
            mode = mode_of(seq, block)
            start = now_ns()
            if mode == "gpu":
                self.seq_word[0] = seq
                self.replays["gpu"]()
                if self.cuda:
                    torch.cuda.synchronize()
                # (the device rang the bell: nothing to post)
            else:
                self.replays["cpu"]()
                if self.cuda:
                    torch.cuda.synchronize()
                self.rsp.native.store(OFF_BELL_SEQ, seq)
            spent[mode].append(now_ns() - start)

    def close(self) -> None:
        if self.registration is not None:
            torch.cuda.synchronize()
            self.registration.release()
        self.bell = self.x_ring = self.y_ring = None
        self.req.close()
        self.rsp.close()


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 6000
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    daemon = Daemon()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=client, args=(daemon.req.name, daemon.rsp.name, calls, results), daemon=True)
    proc.start()
    try:
        spent = daemon.serve(block, proc.is_alive)
        trips, early = results.get(timeout=60)
    finally:
        proc.join(10)
        daemon.close()
    where = torch.cuda.get_device_name(0) if daemon.cuda else "no CUDA: the plumbing only"
    print(f"{where}; {calls} calls in blocks of {block}, the first block of each mode left out")
    for mode in ("cpu", "gpu"):
        seqs = [s for s in range(1, calls + 1) if mode_of(s, block) == mode][block:]
        t = [trips[s - 1] / 1e3 for s in seqs]
        q = statistics.quantiles(t, n=10)
        bad = sum(early[s - 1] for s in seqs)
        own = statistics.median(spent[mode][block:]) / 1e3 if len(spent[mode]) > block else float("nan")
        print(f"{mode} rings: round trip median {statistics.median(t):6.1f} us, p10 {q[0]:6.1f}, p90 {q[-1]:6.1f}; "
              f"the daemon's own time a call {own:6.1f} us; replies seen before their bytes: {bad} of {len(t)}")


if __name__ == "__main__":
    main()
