"""Ring: layout, wraparound, backpressure, bounds, lifetime - in one process and across two."""
import multiprocessing as mp
import os
import random
import stat

import pytest
import torch

from shmrt.errors import ProtocolError, RingFull, SetupError, TensorTooLarge
from shmrt.wire.ring import HEADER_BYTES, OFF_TAIL, Ring, read_header


def test_create_sets_mode_0600_unguessable_name_and_owner_unlinks():
    with Ring.create(1 << 16, "req") as ring:
        path = f"/dev/shm{ring.name}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert len(ring.name) == len("/shmrt-") + 32 + 4
        header = read_header(ring.mapping)
        assert header.capacity == 1 << 16 and header.owner_pid == os.getpid()
        with Ring.attach(ring.name, 1 << 16) as other:
            assert not other.owner
        assert os.path.exists(path), "an attacher must never unlink"
    assert not os.path.exists(path)


def test_attach_rejects_wrong_capacity_and_bad_names():
    with Ring.create(1 << 16, "rsp") as ring:
        with pytest.raises(ProtocolError, match="expected"):
            Ring.attach(ring.name, 1 << 17)
    with pytest.raises(ProtocolError, match="not a shmrt ring name"):
        Ring.attach("/etc-passwd", 4096)
    with pytest.raises(ProtocolError, match="does not exist"):
        Ring.attach("/shmrt-" + "0" * 32 + "-req", 4096)


def test_reserve_times_out_when_ring_full():
    with Ring.create(1 << 12, "req") as ring:
        ring.producer.reserve(3000, timeout=0.1)
        ring.producer.publish()
        with pytest.raises(RingFull, match="not releasing"):
            ring.producer.reserve(3000, timeout=0.2)


def test_tensor_larger_than_ring_is_a_clear_error():
    with Ring.create(1 << 12, "req") as ring:
        with pytest.raises(TensorTooLarge, match="--ring-mib"):
            ring.producer.reserve(1 << 13, timeout=0.1)


def test_corrupted_tail_word_is_detected():
    with Ring.create(1 << 12, "req") as ring:
        ring.producer.reserve(100, timeout=0.1)
        ring.producer.publish()
        ring.native.store(OFF_TAIL, 10**12)  # a hostile consumer scribbles a huge tail
        with pytest.raises(ProtocolError, match="tail"):
            ring.producer.reserve(100, timeout=0.1)


def test_view_bounds_checked():
    with Ring.create(1 << 12, "req") as ring:
        with pytest.raises(ProtocolError):
            ring.view(4000, 200)
        with pytest.raises(ProtocolError):
            ring.view(2**64 - 8, 16)


def test_too_small_shm_fails_at_startup_with_sizes():
    with pytest.raises(SetupError, match=r"has .* MiB free but the ring needs"):
        Ring.create(1 << 50, "req")


def _consume(name, capacity, q_in, q_out):
    with Ring.attach(name, capacity) as ring:
        while True:
            item = q_in.get()
            if item is None:
                return
            end, offset, nbytes, seed = item
            entry = ring.consumer.accept(end)
            data = bytes(ring.view(offset, nbytes))
            expected = random.Random(seed).randbytes(nbytes)
            q_out.put(data == expected)
            ring.consumer.release(entry)


def test_wraparound_2000_random_messages_across_processes():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    capacity = 1 << 16
    with Ring.create(capacity, "req") as ring:
        proc = ctx.Process(target=_consume, args=(ring.name, capacity, q_in, q_out))
        proc.start()
        try:
            inflight = 0
            ok = 0
            for i in range(2000):
                nbytes = rng.choice([0, 1, 63, 64, 100, 4096, rng.randrange(1, 20000)])
                offset = ring.producer.reserve(nbytes, timeout=10)
                payload = random.Random(seed + i).randbytes(nbytes)
                if nbytes:
                    ring.native.copy_in(HEADER_BYTES + offset, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
                q_in.put((ring.producer.publish(), offset, nbytes, seed + i))
                inflight += 1
                if inflight >= 3:  # keep several messages in flight so the ring really wraps under load
                    ok += q_out.get(timeout=10)
                    inflight -= 1
            while inflight:
                ok += q_out.get(timeout=10)
                inflight -= 1
            assert ok == 2000, f"seed={seed}"
            assert ring.producer.head > 10 * capacity  # wrapped many times
        finally:
            q_in.put(None)
            proc.join(10)
