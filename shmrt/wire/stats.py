"""What one call cost, stage by stage: written by the transports, read by the log and the analyzer.
Plain data (no torch, no zmq), so `shmrt analyze` stays light."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CallStats:
    """Timestamps (CLOCK_MONOTONIC ns) of one call's stages and its byte counts.

    Serialize = t_encoded - t_start (tensor copies into the ring or into bytes, plus encoding);
    Send = t_sent - t_encoded; Recv = t_replied - t_sent (includes all daemon work);
    Deserialize = t_decoded - t_replied (copies out of the ring or bytes, decoding).
    With the shared-memory doorbell the C helper encodes a request into its slot as it rings it (Send) and
    checks the reply's record as it takes it (Recv); Serialize and Deserialize keep the rest (the copies, the
    descriptors, the views).
    """

    method: str
    transport: str
    layer: int = -1
    t_start: int = 0
    t_encoded: int = 0
    t_sent: int = 0
    t_replied: int = 0
    t_decoded: int = 0
    sent_bytes: int = 0
    recv_bytes: int = 0
    payload_sent: int = 0      # tensor bytes only
    payload_recv: int = 0
    copy_in_ns: int = 0        # of Serialize: time spent in the C helper's copies
    work_ns: int = 0           # daemon-reported compute time (informational)
    op: int = 0                # the doorbell's argument bits (model/calls.py): which projections, which matmul

    @property
    def serialize_ns(self) -> int:
        return self.t_encoded - self.t_start

    @property
    def send_ns(self) -> int:
        return self.t_sent - self.t_encoded

    @property
    def recv_ns(self) -> int:
        return self.t_replied - self.t_sent

    @property
    def deserialize_ns(self) -> int:
        return self.t_decoded - self.t_replied

    @property
    def total_ns(self) -> int:
        return self.t_decoded - self.t_start
