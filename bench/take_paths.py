"""A doorbell take of a repeated record, two ways, in one process: as every take was before session 18 (the C take,
the words unpacked, protocol.from_words, accept_views) and as BellIn takes it now (a Rung: the record's shape known
by its fixed words, accept_rung's views made once). Warm, and after streaming THRASH_MB through the caches before
each take (what a CPU daemon's product does between two calls). Medians, us a take, calls alternating.

    PYTHONPATH=. python bench/take_paths.py [THRASH_MB ...]        # default: 0 2 8
"""
import statistics
import sys
import time

from shmrt import settings

settings.apply_process_defaults()

import torch  # noqa: E402

from shmrt.wire import protocol  # noqa: E402
from shmrt.wire.bell import BellIn, BellOut  # noqa: E402
from shmrt.wire.native import lib  # noqa: E402
from shmrt.wire.protocol import Method  # noqa: E402
from shmrt.wire.ring import Ring  # noqa: E402
from shmrt.wire.shm_transport import accept_rung, accept_views, describe_input  # noqa: E402

CAP, TOKEN, CALLS = 1 << 22, b"t" * 16, 4000


def measure(thrash_mb: float) -> dict[str, float]:
    times = {"per call": [], "known": []}
    source, sink = torch.empty(int(thrash_mb * (1 << 18))), torch.empty(int(thrash_mb * (1 << 18)))
    with Ring.create(CAP, "req") as mine, Ring.attach(mine.name, CAP) as theirs, torch.inference_mode():
        out, bell_in = BellOut(mine, TOKEN), BellIn(theirs, TOKEN, CAP)
        native = bell_in._native
        inputs = [torch.randn(1024), torch.randn(2048)]   # two records, alternating, as a decode step's repeat
        seq = 0
        for i in range(CALLS):
            for way in times:
                seq += 1
                desc, _ = describe_input(mine, inputs[i % 2], None, None, 10)
                out.post_call(Method.Matmul.value, seq, 3, 0, seq, mine.producer.publish(), [desc])
                sink.copy_(source)
                start = time.perf_counter_ns()
                if way == "per call":
                    lib.shmrt_bell_take_record(native.c, seq, 0, native.words)
                    bell = protocol.from_words(native.checked(), TOKEN)
                    views, release = accept_views(theirs, bell.ring_end, bell.tensors)
                else:
                    views, release = accept_rung(theirs, bell_in.take_checked(seq))
                took = time.perf_counter_ns() - start
                release()
                if i >= CALLS // 10:
                    times[way].append(took)
    return {way: statistics.median(t) / 1e3 for way, t in times.items()}


if __name__ == "__main__":
    for mb in [float(a) for a in sys.argv[1:]] or [0, 2, 8]:
        m = measure(mb)
        print(f"thrash {mb:4.0f} MB: per call {m['per call']:6.2f} us, known {m['known']:6.2f} us")
