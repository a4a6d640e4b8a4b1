"""What a long-lived shmrt process (the daemon, the enclave's client, the bench's floor) does with its heap once it
is set up. Both sides use it: the enclave's manifest trusts this file."""
from __future__ import annotations

import gc

_heap_frozen = False


def freeze_heap() -> None:
    """Once set up (imports, the model loaded, the session open): collect, then take every object alive now out of
    the cyclic collector's reach (gc.freeze). Torch and a model leave ~200k of them, and a full collection walks
    them all: ~150 ms on 2 cores, which then landed in the middle of a decode step (on both sides: in a daemon's
    call loop one in ~2000 calls, and the mean call time doubled). Younger objects are collected as before. Once
    per process, called by the entry points (`shmrt daemon`, `shmrt client` and `run`, the bench), not by the
    classes they use: a test run keeps the collector's normal course."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()
