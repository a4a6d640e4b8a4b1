"""Ring: layout, wraparound, backpressure, bounds, lifetime - in one process and across two."""
import multiprocessing as mp
import os
import random
import stat

import pytest
import torch

from shmrt.errors import ProtocolError, RingFull, SetupError, TensorTooLarge
from shmrt.wire.protocol import TensorDesc
from shmrt.wire.ring import HEADER_BYTES, LAPS_UNTIL, OFF_TAIL, VIEWS_KEPT, Ring, align_up, read_header


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


def test_a_closed_rings_producer_refuses_instead_of_touching_the_unmapped_header():
    """The producer's state lives in the C helper and points into the mapping: close() detaches it first, so a
    reservation or publish after it is a clear error, never a write to unmapped memory."""
    ring = Ring.create(1 << 12, "req")
    ring.producer.reserve(100, timeout=0.1)
    ring.close()
    with pytest.raises(ProtocolError, match="outside the mapped buffer"):
        ring.producer.publish()
    with pytest.raises(ProtocolError, match="outside the mapped buffer"):
        ring.producer.reserve(100, timeout=0.1)


def test_a_tail_word_behind_the_last_one_seen_is_detected():
    """The consumer's tail may only grow: one that moves back (a scribble) is refused, as one past the head is."""
    with Ring.create(1 << 12, "req") as ring:
        peer_tail = 0
        for _ in range(3):
            ring.producer.reserve(100, timeout=0.1)
            peer_tail = ring.producer.publish()
            ring.native.store(OFF_TAIL, peer_tail)
        ring.producer.reserve(100, timeout=0.1)   # loads and keeps the tail
        ring.producer.publish()
        ring.native.store(OFF_TAIL, peer_tail - 64)
        with pytest.raises(ProtocolError, match=f"consumer tail {peer_tail - 64} outside"):
            ring.producer.reserve(100, timeout=0.1)


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


def test_tensor_views_alias_the_ring_bytes_and_are_bounds_checked():
    with Ring.create(64 * 1024, "req") as creator, Ring.attach(creator.name, creator.capacity) as peer:
        src = torch.arange(12, dtype=torch.float32).view(3, 4)
        creator.tensor(4096, 48, torch.float32, (3, 4)).copy_(src)
        seen = peer.tensor(4096, 48, torch.float32, (3, 4))
        assert torch.equal(seen, src) and seen.is_contiguous()
        assert seen.data_ptr() == peer.native.address + peer.data_offset + 4096   # a view, no copy
        odd = peer.tensor(4098, 8, torch.int16, (2, 2))                          # not a multiple of 4: still right
        assert odd.tolist() == [[0, 0], [16256, 0]]          # the top half of 0.0, 1.0 (0x3f800000), 2.0
        for offset, nbytes in ((64 * 1024 - 8, 16), (-8, 8), (1 << 62, 8)):
            with pytest.raises(ProtocolError, match="outside ring"):
                peer.tensor(offset, nbytes, torch.float32, (nbytes // 4,))
        del seen


def test_views_are_kept_per_offset_dtype_and_shape():
    with Ring.create(64 * 1024, "req") as ring:
        a = ring.tensor(4096, 48, torch.float32, (3, 4))
        assert ring.tensor(4096, 48, torch.float32, (3, 4)) is a              # made once, handed out again
        b = ring.tensor(4096, 48, torch.float32, (4, 3))
        assert b is not a and b.shape == (4, 3) and b.data_ptr() == a.data_ptr()
        a.copy_(torch.arange(12.0).view(3, 4))
        for i in range(VIEWS_KEPT + 5):                                       # past the bound: starts over
            v = ring.tensor(64 * (i + 100), 4, torch.float32, (1,))
            assert v.data_ptr() == ring.native.address + ring.data_offset + 64 * (i + 100)
        assert len(ring._views) <= VIEWS_KEPT
        again = ring.tensor(4096, 48, torch.float32, (3, 4))
        assert torch.equal(again, torch.arange(12.0).view(3, 4))
        with pytest.warns(UserWarning, match="resized"):      # an out= of another shape resizes the view ...
            torch.add(torch.ones(12), 1, out=again)
        assert ring.tensor(4096, 48, torch.float32, (3, 4)).shape == (3, 4)   # ... which is not handed out again
        del a, b, v, again


def test_a_message_that_finds_the_ring_empty_starts_at_a_lap_start():
    """Offset 0 and half the ring, alternately, for the messages of an alternating exchange (decode's views
    and DMA addresses repeat, a stale view of the last call is never the next call's); one that finds an
    earlier message still held goes after it; the consumer accepts the ends of the moved messages."""
    cap = 1 << 14
    with Ring.create(cap, "rsp") as ring, Ring.attach(ring.name, cap) as peer:
        assert ring.lap_starts == (0, cap // 2)

        def send(*sizes):
            offsets = [ring.producer.reserve(n, timeout=0.1) for n in sizes]
            return offsets, peer.consumer.accept(ring.producer.publish())

        for i in range(50):                                    # many laps
            first = 100 + 37 * i
            offsets, entry = send(first, 700)
            start = (0, cap // 2)[i % 2]
            assert offsets == [start, start + align_up(first, 64)]
            peer.consumer.release(entry)
        assert ring.producer.head > 20 * cap                   # half a lap or more per message
        (held_at,), held = send(1000)
        (second,), entry = send(64)
        assert second == held_at + 1024                        # the first is still held: right after it
        peer.consumer.release(entry)
        peer.consumer.release(held)
        assert send(64)[0][0] in ring.lap_starts               # all released again: a lap start
        with pytest.raises(ProtocolError, match="outside"):    # more than two laps past the tail: refused
            peer.consumer.accept(peer.consumer.tail + 2 * cap + 1)


def test_a_message_whose_first_tensor_fits_only_from_the_lap_start_goes_there():
    """An empty ring holds any tensor up to its capacity: a message due at the half-way lap start whose first
    tensor would run past the end starts at offset 0 instead (it was refused as too large for the ring), and the
    alternation goes on after it."""
    cap = 1 << 16
    with Ring.create(cap, "rsp") as ring, Ring.attach(ring.name, cap) as peer:
        def send(n):
            offset = ring.producer.reserve(n, timeout=0.1)
            peer.consumer.release(peer.consumer.accept(ring.producer.publish()))
            return offset

        assert send(64) == 0                                   # the next message is due at cap // 2
        assert send(cap // 2 + 4096) == 0                      # more than half the ring: from the lap's start
        assert send(cap) == 0                                  # the whole ring
        assert [send(64) for _ in range(3)] == [cap // 2, 0, cap // 2]   # the half was still next
        with pytest.raises(TensorTooLarge, match="--ring-mib"):
            send(cap + 64)


def test_a_first_tensor_that_waited_for_a_held_message_starts_over_at_the_lap_start():
    """A message that found the ring in use goes after the held one; if its first tensor fits only an empty ring,
    it waits, and once the consumer has released everything it starts at the lap's start (it was refused as too
    large for the ring the moment the ring emptied)."""
    import threading
    cap = 1 << 16
    with Ring.create(cap, "rsp") as ring, Ring.attach(ring.name, cap) as peer:
        ring.producer.reserve(100, timeout=0.1)
        held = peer.consumer.accept(ring.producer.publish())
        threading.Timer(0.05, peer.consumer.release, (held,)).start()
        assert ring.producer.reserve(cap, timeout=2.0) == 0
        peer.consumer.release(peer.consumer.accept(ring.producer.publish()))


def test_a_message_that_cannot_fit_from_where_it_began_is_refused_at_once():
    """Nothing but the message itself left in the ring: waiting cannot make room, so it is TensorTooLarge now (it
    was RingFull after the whole timeout, blaming the consumer)."""
    import time
    cap = 1 << 16
    with Ring.create(cap, "rsp") as ring, Ring.attach(ring.name, cap) as peer:
        ring.producer.reserve(64, timeout=0.1)
        peer.consumer.release(peer.consumer.accept(ring.producer.publish()))   # the next message is due at cap // 2
        assert ring.producer.reserve(64, timeout=0.1) == cap // 2
        started = time.monotonic()
        with pytest.raises(TensorTooLarge, match="plus the rest of its message"):
            ring.producer.reserve(cap // 2 + 4096, timeout=5.0)
        assert time.monotonic() - started < 1.0


def test_a_tail_past_what_was_published_is_a_protocol_error():
    """The consumer may release only published messages: a tail at the head of a message still being built (whose
    bytes the next reservation would then reuse) is a scribbled header."""
    with Ring.create(1 << 14, "req") as ring:
        ring.producer.reserve(100, timeout=0.1)
        ring.producer.publish()
        ring.producer.reserve(100, timeout=0.1)                # a message being built, not published
        ring.native.store(OFF_TAIL, ring.producer.head)
        with pytest.raises(ProtocolError, match="tail"):
            ring.producer.reserve(100, timeout=0.1)


def test_poison_covers_a_released_message_and_nothing_after_it():
    """A reply held across the next call, then released: with poison, its bytes turn to 0xFF and those of
    the next message, which may lie where the first skipped to its lap start, stay intact."""
    cap = 1 << 14
    with Ring.create(cap, "rsp") as ring, Ring.attach(ring.name, cap, poison=True) as peer:
        def send(nbytes, fill):
            offset = ring.producer.reserve(nbytes, timeout=0.1)
            ring.view(offset, nbytes)[:] = bytes([fill]) * nbytes
            desc = TensorDesc(offset, nbytes, torch.uint8, (nbytes,))
            return desc, peer.consumer.accept(ring.producer.publish(), (desc,))

        for fill in (1, 2, 3):                                 # lap starts used, skipped bytes behind them
            desc, entry = send(3000, fill)
            peer.consumer.release(entry)
        held_desc, held = send(2000, 4)                        # at half the ring, skipping [3000, 8192), held ...
        next_desc, following = send(7000, 5)                   # ... while the next does not fit after it: it
        assert (held_desc.offset, next_desc.offset) == (cap // 2, 0)   # wraps onto the skipped bytes
        peer.consumer.release(held)
        assert bytes(peer.view(held_desc.offset, held_desc.nbytes)) == b"\xff" * held_desc.nbytes
        assert bytes(peer.view(next_desc.offset, next_desc.nbytes)) == b"\x05" * next_desc.nbytes
        peer.consumer.release(following)
        assert bytes(peer.view(next_desc.offset, next_desc.nbytes)) == b"\xff" * next_desc.nbytes


def test_positions_past_laps_until_grow_by_bytes_again():
    """A lap per message would run u64 positions out on a huge ring: far along, messages follow each other."""
    with Ring.create(1 << 14, "req") as ring:
        ring.producer.head = ring.producer.known_tail = ring.producer.published = LAPS_UNTIL + 100
        ring.native.store(OFF_TAIL, LAPS_UNTIL + 100)   # everything released: below LAPS_UNTIL this starts a lap
        assert ring.producer.reserve(64, timeout=0.1) == 128
        assert ring.producer.publish() == LAPS_UNTIL + 192


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


# ---- the host changes a segment under its creator (real processes: the fault ends the process)

FAULT_CHILD = r"""
import mmap, os, sys, tempfile
from shmrt.wire import native
from shmrt.wire.ring import Ring
native.set_fault_program("shmrt client")
how, where = sys.argv[1], sys.argv[2]
req, rsp = Ring.create(1 << 16, "req"), Ring.create(1 << 16, "rsp")
ring = req if where == "req" else rsp
print(req.name, rsp.name, flush=True)
path = "/dev/shm" + ring.name
if how == "shrink-to-0":          # the header page goes: the next head/tail store faults
    os.truncate(path, 0)
    ring.native.store(64, 1)
elif how == "shrink-mid-data":    # the header survives; a copy into the data area faults (in C)
    import torch
    os.truncate(path, 4096 + 8192)
    ring.native.copy_in(4096 + 4096, torch.ones(4096))
elif how == "shrink-torch-view":  # torch reads a view of the ring (a tensor kernel faults)
    import torch
    os.truncate(path, 4096)
    print(float(torch.frombuffer(ring.data, dtype=torch.float32).sum()))
elif how == "shrink-many-threads":  # threads fault at once (as torch's intra-op threads may): one line
    import threading
    import torch
    os.truncate(path, 4096)
    view = torch.frombuffer(ring.data, dtype=torch.float32)
    start = threading.Barrier(8)

    def read():
        start.wait()
        float(view.sum())
    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
elif how == "grow":               # harmless: the mapping keeps its length
    os.truncate(path, 4096 + (1 << 20))
    ring.data[:] = b"\x07" * len(ring.data)
    assert bytes(ring.data[-4:]) == b"\x07" * 4
elif how == "replace":            # harmless: the mapping keeps the original pages
    os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 0)
    ring.data[:] = b"\x07" * len(ring.data)
    ring.native.store(64, 5)
    assert ring.native.load(64) == 5
elif how == "unguarded":          # a SIGBUS outside any ring keeps its default action
    with tempfile.TemporaryFile() as f:
        f.truncate(1 << 16)
        m = mmap.mmap(f.fileno(), 1 << 16)
        f.truncate(0)
        m[8192] = 1
print("survived", flush=True)
req.close()
rsp.close()
"""


@pytest.fixture(scope="module")
def run_fault_child(tmp_path_factory):
    """FAULT_CHILD HOW WHERE as `python -c` runs it, forked from tests/cli_zygote.py, which imported torch
    once (~3 s of CPU per child otherwise, 11 children). Each child is still its own process that maps
    its rings, faults and exits (or dies of SIGBUS) by itself; no core dumps, as before."""
    import subprocess
    from cli_zygote import Zygote
    zygote = Zygote(dict(os.environ))
    work = tmp_path_factory.mktemp("faults")

    def run(how: str, where: str) -> subprocess.CompletedProcess:
        out, err = work / f"{how}-{where}.out", work / f"{how}-{where}.err"
        rc = zygote.run([how, where], cwd=os.getcwd(), stdout=out, stderr=err, timeout=60, code=FAULT_CHILD)
        return subprocess.CompletedProcess(["-c", FAULT_CHILD, how, where], rc, out.read_text(), err.read_text())
    yield run
    zygote.close()


@pytest.mark.parametrize("where", ["req", "rsp"])
@pytest.mark.parametrize("how", ["shrink-to-0", "shrink-mid-data", "shrink-torch-view", "shrink-many-threads"])
def test_a_ring_shrunk_by_the_host_ends_the_process_with_one_line_exit_2_and_no_segment(run_fault_child, how, where):
    proc = run_fault_child(how, where)
    names = proc.stdout.split()[:2]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # -7 would be SIGBUS (a core dump)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    ring_name = names[0] if where == "req" else names[1]
    assert lines[0].startswith(f"shmrt client: error: ring {ring_name} shrank") and "restart the daemon" in lines[0]
    for name in names:
        assert not os.path.exists(f"/dev/shm{name}"), f"{name} left behind"


@pytest.mark.parametrize("how", ["grow", "replace"])
def test_a_ring_grown_or_replaced_by_the_host_keeps_working_and_nothing_is_left(run_fault_child, how):
    proc = run_fault_child(how, "req")
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]
    for name in proc.stdout.split()[:2]:
        assert not os.path.exists(f"/dev/shm{name}")


def test_a_sigbus_outside_the_rings_keeps_its_default_action(run_fault_child):
    proc = run_fault_child("unguarded", "req")
    assert proc.returncode == -7, (proc.returncode, proc.stderr[-2000:])
    for name in proc.stdout.split()[:2]:  # the process died without closing: remove what it left
        if os.path.exists(f"/dev/shm{name}"):
            os.unlink(f"/dev/shm{name}")


def test_a_view_made_in_inference_mode_is_not_handed_out_outside_it():
    with Ring.create(1 << 14, "req") as ring:
        with torch.inference_mode():
            inside = ring.tensor(0, 16, torch.float32, (4,))
            inside.fill_(1.0)
        outside = ring.tensor(0, 16, torch.float32, (4,))
        assert outside is not inside and not outside.is_inference()
        outside.add_(1.0)                                   # in place outside inference mode: allowed on this one
        assert inside.tolist() == [2.0] * 4                 # the same bytes
        del inside, outside
