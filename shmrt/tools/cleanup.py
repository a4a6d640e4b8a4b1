"""`shmrt cleanup`: unlink ring segments whose creator process is dead (owner pid in the header).

A segment is only touched when its header is a valid shmrt ring header and the recorded owner
pid does not exist (or is a zombie) in this pid namespace; live owners' segments are never removed.
"""
from __future__ import annotations

import mmap
import os

from ..errors import ProtocolError
from ..units import format_bytes
from ..wire.ring import HEADER_BYTES, NAME_RE, SHM_DIR, read_header, unlink_segment
from ..wire.peer import process_alive


def segment_owner(name: str) -> tuple[int, int] | None:
    """(owner pid, bytes) from a shmrt segment's header; None if it is not a valid shmrt ring."""
    if not NAME_RE.match(name):
        return None
    try:
        with open(os.path.join(SHM_DIR, name.lstrip("/")), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_BYTES:
                return None
            with mmap.mmap(f.fileno(), HEADER_BYTES, prot=mmap.PROT_READ) as mm:
                return read_header(mm).owner_pid, size
    except (OSError, ProtocolError, ValueError):
        return None


def stale_segments() -> list[tuple[str, int, int]]:
    """(name, owner pid, bytes) of every shmrt segment whose owner is gone."""
    out = []
    for entry in sorted(os.listdir(SHM_DIR)):
        owner = segment_owner("/" + entry)
        if owner is not None and not process_alive(owner[0]):
            out.append(("/" + entry, *owner))
    return out


def cleanup(*, dry_run: bool = False) -> int:
    stale = stale_segments()
    for name, pid, size in stale:
        if dry_run:
            print(f"would remove {name} ({format_bytes(size)}, owner pid {pid} is gone)")
        elif unlink_segment(name):
            print(f"removed {name} ({format_bytes(size)}, owner pid {pid} was gone)")
    if not stale:
        print("no stale shmrt segments")
    return 0
