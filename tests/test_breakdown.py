"""tools/breakdown.py on hand-made calls whose every stage is known: the same numbers from CallStats
and from the sidecar records the perf log writes for them; calls outside a phase are left out."""
import pytest

from shmrt.model.calls import matmul_bits, projection_bits
from shmrt.tools.breakdown import STAGES, Call, breakdown, by_method, by_phase, combined, describe, per_call
from shmrt.tools.perflog import PerfLog, read_sidecar
from shmrt.wire.stats import CallStats

BASE = 10**12  # ns: CLOCK_MONOTONIC values are large


def call(method, start_us, enc_us, sent_us, replied_us, decoded_us, work_us, sent=100, recv=200, op=0):
    us = lambda t: BASE + t * 1000  # noqa: E731
    return CallStats(method, "shm", op=op, t_start=us(start_us), t_encoded=us(enc_us), t_sent=us(sent_us),
                     t_replied=us(replied_us), t_decoded=us(decoded_us), work_ns=work_us * 1000,
                     sent_bytes=sent, recv_bytes=recv)


# Init before the phases; prefill [0, 10 ms) with 2 calls; decode [10, 20 ms) with 2 steps of one call.
CALLS = [call("Init", -5000, -4900, -4800, -4200, -4100, 100),
         call("Embedding", 1000, 1200, 1300, 3300, 3500, 1500),
         call("BatchLinear", 4000, 4500, 4600, 7600, 8000, 2000),
         call("LMHead", 11000, 11100, 11200, 12200, 12300, 600),
         call("LMHead", 15000, 15100, 15200, 16200, 16300, 600)]
PHASES = [("prefill", 0, 10_000, 4), ("decode", 10_000, 20_000, 2)]  # name, start us, end us, tokens

# what each phase must come to, in ms
PREFILL = {"wall": 10, "calls": 6.5, "daemon": 3.5, "transport": 3.0, "enclave": 3.5,
           "encode": 0.7, "doorbell": 0.2, "wait": 1.5, "decode": 0.6}
DECODE = {"wall": 10, "calls": 2.6, "daemon": 1.2, "transport": 1.4, "enclave": 7.4,
          "encode": 0.2, "doorbell": 0.2, "wait": 0.8, "decode": 0.2}


def write_sidecar(path):
    with PerfLog(str(path), "SHM+IPC", {}) as log:
        log.on_phase("init", BASE, None, 0)
        log(CALLS[0])
        for (name, start, end, tokens), calls in zip(PHASES, (CALLS[1:3], CALLS[3:])):
            log.on_phase(name, BASE + start * 1000, None, 0)
            for c in calls:
                log(c)
            log.on_phase(name, BASE + start * 1000, BASE + end * 1000, tokens)
    return read_sidecar(str(path) + ".jsonl")


def check(b, expected_ms):
    got = {k: 1e3 * getattr(b, k + "_s") for k in expected_ms}
    assert got == pytest.approx(expected_ms, abs=1e-9)
    assert b.enclave_s + b.transport_s + b.daemon_s == pytest.approx(b.wall_s)
    assert sum(getattr(b, st + "_s") for st in STAGES) == pytest.approx(b.transport_s)


def test_sidecar_phases_split_three_ways_and_by_stage(tmp_path):
    side = write_sidecar(tmp_path / "x.log")
    assert [c["phase"] for c in side.calls] == ["init", "prefill", "prefill", "decode", "decode"]
    pre, dec = by_phase(side.calls, side.phases)
    assert (pre.phase, pre.tokens, pre.calls, dec.phase, dec.tokens, dec.calls) == ("prefill", 4, 2, "decode", 2, 2)
    check(pre, PREFILL)
    check(dec, DECODE)
    check(dec.per_token(), {k: v / 2 for k, v in DECODE.items()})
    assert (pre.sent_bytes, pre.recv_bytes) == (200, 400)


def test_callstats_and_sidecar_records_give_the_same_breakdown(tmp_path):
    side = write_sidecar(tmp_path / "x.log")
    assert [Call.of(c) for c in CALLS] == [Call.of(r) for r in side.calls]
    live = by_phase(CALLS, [dict(zip(("phase", "start_ns", "end_ns", "tokens"),
                                     (n, BASE + s * 1000, BASE + e * 1000, t))) for n, s, e, t in PHASES])
    assert live == by_phase(side.calls, side.phases)


def test_calls_alone_have_no_enclave_time_and_methods_sum_to_all_calls():
    b = breakdown(CALLS)
    assert b.enclave_s == 0 and b.calls == 5
    methods = by_method(CALLS)
    assert sorted(methods) == ["BatchLinear", "Embedding", "Init", "LMHead"] and methods["LMHead"].calls == 2
    assert sum(m.calls_s for m in methods.values()) == pytest.approx(b.calls_s)
    check(methods["LMHead"], {k: DECODE[k] for k in ("calls", "daemon", "transport", "wait")})


def test_combined_phases_add_up_and_describe_in_one_line():
    parts = by_phase(CALLS, [type("P", (), dict(name=n, start_ns=BASE + s * 1000, end_ns=BASE + e * 1000,
                                                tokens=t)) for n, s, e, t in PHASES])
    both = combined(parts)
    check(both, {k: PREFILL[k] + DECODE[k] for k in PREFILL})
    assert both.calls == 4 and both.tokens == 6
    assert describe(both) == "transport 4.4 ms (22.0%), daemon compute 4.7 ms, enclave compute 10.9 ms, 4 calls"


def test_a_sidecar_cut_mid_line_keeps_what_came_before(tmp_path):
    side = write_sidecar(tmp_path / "x.log")
    path = tmp_path / "x.log.jsonl"
    path.write_text(path.read_text()[:-20])  # the last phase record is cut
    cut = read_sidecar(str(path))
    assert cut.calls == side.calls and cut.phases[:1] == side.phases[:1]
    # the cut phase is taken from its calls' span (Sidecar.add_cut_phases), marked
    decode_calls = [c for c in side.calls if c["phase"] == "decode"]
    assert cut.phases[1:] == [{"type": "phase", "phase": "decode", "start_ns": decode_calls[0]["t_start_ns"],
                               "end_ns": decode_calls[-1]["t_decoded_ns"],
                               "tokens": sum(c["method"] == "LMHead" for c in decode_calls), "cut_short": True}]
    assert read_sidecar(str(tmp_path / "missing.jsonl")) is None


def test_per_call_names_each_kind_of_call_and_gives_its_median_stages_and_the_enclave_before_it(tmp_path):
    """Two decode steps of one layer (calls every 1000 us, each 10 encode, 5 doorbell, 100 recv of which the
    daemon's work varies, 20 decode), logged and read back: one row per kind, in call order."""
    kinds = [("Embedding", 0), ("BatchLinear", projection_bits(["q_proj", "k_proj", "v_proj"])),
             ("Matmul", matmul_bits(True, "k")), ("AttentionOutput", matmul_bits(False, "v")),
             ("BatchLinear", projection_bits(["gate_proj", "up_proj"])),
             ("BatchLinear", projection_bits(["down_proj"])),
             ("LMHead", 0), ("BatchLinear", 1 << 9)]   # op bits no log can explain: the bare method
    calls, t = [], 0
    for step in range(2):
        for i, (method, op) in enumerate(kinds):
            calls.append(call(method, t, t + 10, t + 15, t + 115, t + 135, 40 + 10 * i + step * 20, op=op))
            t += 1000
    with PerfLog(str(tmp_path / "x.log"), "SHM+IPC", {}) as log:
        for c in calls:
            log(c)
    side = read_sidecar(str(tmp_path / "x.log") + ".jsonl")
    rows = per_call(side.calls)
    assert rows == per_call(calls)
    assert [r.label for r in rows] == ["Embedding", "BatchLinear q|k|v", "Matmul QK^T", "AttentionOutput",
                                       "BatchLinear gate|up", "BatchLinear down", "LMHead", "BatchLinear"]
    assert all(r.calls == 2 for r in rows)
    assert [r.daemon_us for r in rows] == [50 + 10 * i for i in range(8)]   # medians of 40+10i and 60+10i
    assert [r.wait_us for r in rows] == [50 - 10 * i for i in range(8)]     # recv 100 less the work
    assert {(r.encode_us, r.doorbell_us, r.decode_us) for r in rows} == {(10.0, 5.0, 20.0)}
    assert {r.enclave_us for r in rows} == {865.0}   # 1000 between starts less the 135 of the call before


def test_calls_logged_without_op_bits_are_named_by_their_method_alone():
    """A sidecar from before the op bits were logged: no guessing (op 0 would read as Matmul P*V)."""
    record = {"method": "Matmul", "t_start_ns": 0, "t_encoded_ns": 1, "t_sent_ns": 2, "t_replied_ns": 3,
              "t_decoded_ns": 4, "sent_bytes": 0, "recv_bytes": 0}
    assert Call.of(record).label == "Matmul"
    assert Call.of(record | {"op": matmul_bits(False, "v")}).label == "Matmul P*V"
    assert Call.of(record | {"method": "BatchLinear", "op": "7"}).label == "BatchLinear"   # not an int: the method
