"""How late a shm client sees a reply, by how long the daemon works and how large the reply is: an echo daemon
whose handler busy-waits `pos` microseconds and replies `layer` float32 zeros (0: the request echoed); 250
round trips each, the first 50 dropped. `late` is the client's wait less the daemon's reported work: the doorbell,
the daemon's loop and both wake-ups.

    PYTHONPATH=. python bench/reply_waits.py                          # as the CLI runs: OMP_WAIT_POLICY=PASSIVE
    OMP_WAIT_POLICY=ACTIVE PYTHONPATH=. python bench/reply_waits.py   # OpenMP workers that spin after each op

Session 17 on 2 cores: without PASSIVE the daemon's OpenMP workers (a 513 KB zero_ runs on both threads) spun on
the client's core and the client saw those replies 2-5 ms late at the 90th percentile."""
import multiprocessing as mp
import os
import statistics

from shmrt import settings

settings.apply_process_defaults()   # as the CLI does, before torch loads

import torch  # noqa: E402

from shmrt.host.handler import INIT, Call, EchoHandler, _no_state, table  # noqa: E402
from shmrt.host.server import Server  # noqa: E402
from shmrt.wire.native import now_ns  # noqa: E402
from shmrt.wire.peer import client_info  # noqa: E402
from shmrt.wire.protocol import RPC_METHODS  # noqa: E402
from shmrt.wire.registry import client_transport  # noqa: E402

CASES = ((150, 0), (150, 128256), (30, 128256), (150, 16384), (150, 2048))   # (handler us, reply floats)


def _work_then_reply(handler, session, request, builder) -> None:
    start = now_ns()
    while now_ns() - start < request.pos * 1000:
        pass
    if request.layer > 0:
        builder.alloc((request.layer,), torch.float32).zero_()
    else:
        for t in request.tensors:
            builder.alloc(t.shape, t.dtype).copy_(t)


class WorkingEcho(EchoHandler):
    calls = table(Call(INIT, 0, _no_state), *(Call(n, None, _work_then_reply) for n in RPC_METHODS if n != INIT))


def _serve(endpoint: str) -> None:
    with Server(endpoint, WorkingEcho(), log=lambda m: None) as server:
        server.serve()


def main() -> None:
    endpoint = f"ipc:///tmp/rw-{os.getpid()}.sock"
    daemon = mp.get_context("spawn").Process(target=_serve, args=(endpoint,), daemon=True)
    daemon.start()
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {os.cpu_count()} CPUs")
    with client_transport("shm", endpoint, timeout=60, doorbell="shm") as t:
        t.hello(client_info())
        t.open_session(1 << 22)
        t.call("Init").release()
        x = torch.randn(1024)
        for work_us, floats in CASES:
            rows = []
            t.observers[:] = [rows.append]
            for _ in range(250):
                t.call("Matmul", [x], pos=work_us, layer=floats).release()
            trip = [r.total_ns / 1e3 for r in rows[50:]]
            late = [(r.recv_ns - r.work_ns) / 1e3 for r in rows[50:]]
            p90 = statistics.quantiles(trip, n=10)[-1]
            print(f"work {work_us:4d} us, reply {floats * 4 if floats else 4096:7d} B: round trip median "
                  f"{statistics.median(trip):7.1f} p90 {p90:7.1f} max {max(trip):7.1f} us; late median "
                  f"{statistics.median(late):6.1f} max {max(late):7.1f} us")
    daemon.terminate()
    daemon.join(5)


if __name__ == "__main__":
    main()
