"""`shmrt bench` as a user runs it (a real daemon process per transport), shrunk to seconds: the
records follow the schema of the bench issue, the numbers add up, and every log it leaves is one the
analyzer reads back with the same call count. No timing is asserted here: benchmarks measure, tests
only check that what they write is complete and consistent."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from shmrt.model.config import LlamaConfig

E2E_KEYS = {"suite", "transport", "wire_dtype", "kv_cache", "phase", "tokens", "median_s", "transport_s",
            "floor_s", "calls", "sent_bytes", "recv_bytes", "machine"}
MICRO_KEYS = {"suite", "transport", "nbytes", "median_s", "p10_s", "p90_s", "repeats"}


def test_bench_all_writes_complete_consistent_records_tables_plots_and_readable_logs(tmp_path):
    out = tmp_path / "res"
    run = subprocess.run([sys.executable, "-m", "shmrt", "bench", "--suite", "all", "--model", "tiny",
                          "--prompts", "8", "--new-tokens", "2", "--repeats", "3", "--sizes", "4KiB,64KiB",
                          "--out", str(out)], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "SHMRT_RUNTIME_DIR": str(tmp_path / "rt")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "msgpack/shm" in run.stdout and "shm/floor" in run.stdout  # the micro table with its ratios
    assert not list((tmp_path / "rt" / "shmrt").glob("bench-*")), "the micro suite left its servers' sockets behind"
    records = json.loads((out / "results.json").read_text())

    micro = [r for r in records if r["suite"] == "micro"]
    kinds = ("copies", "floor-shm", "shm", "floor-zmq", "shm-zmqbell", "msgpack")   # each doorbell beside its floor
    assert {(r["transport"], r["nbytes"]) for r in micro} == set(itertools.product(kinds, (4096, 65536)))
    for r in micro:
        assert MICRO_KEYS <= r.keys() and r["repeats"] >= 20 and 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"]
    allowed = os.sched_getaffinity(0)   # the client and every echo side pinned to two CPUs, where there are two
    assert all(r["cpus"] is None if len(allowed) < 2 else len(set(r["cpus"])) == 2 and set(r["cpus"]) <= allowed
               for r in micro)

    e2e = [r for r in records if r["suite"] == "e2e" and r["transport"] != "floor"]
    configs = set(itertools.product(("msgpack", "shm"), ("float32", "bfloat16"), ("daemon", "client"),
                                    ("prefill", "decode")))
    assert {(r["transport"], r["wire_dtype"], r["kv_cache"], r["phase"]) for r in e2e} == configs
    floors = {(r["wire_dtype"], r["kv_cache"], r["phase"]): r for r in records
              if r["suite"] == "e2e" and r["transport"] == "floor"}
    assert floors.keys() == {c[1:] for c in configs}
    assert all(r["calls"] == 0 and r["transport_s"] == 0 and r["median_s"] == r["floor_s"] for r in floors.values())
    layers = LlamaConfig.from_name("tiny").num_hidden_layers
    per_forward = {"daemon": 4 * layers + 2, "client": 5 * layers + 2}   # fewest: 4 a layer with K/V on the daemon
    for r in e2e:
        assert E2E_KEYS <= r.keys(), r
        assert r["machine"] and r["median_s"] > 0
        assert r["floor_s"] == floors[r["wire_dtype"], r["kv_cache"], r["phase"]]["median_s"] > 0
        assert 0 < r["transport_s"] < r["median_s"]
        assert r["tokens"] == (8 if r["phase"] == "prefill" else 2)
        assert r["calls"] == per_forward[r["kv_cache"]] * (1 if r["phase"] == "prefill" else 2)
        assert r["sent_bytes"] > 0 and r["recv_bytes"] > 0
    # bfloat16 halves the float payload on the wire; client-side K/V sends more while decoding
    by = {(r["transport"], r["wire_dtype"], r["kv_cache"], r["phase"]): r for r in e2e}
    for t, kv in itertools.product(("msgpack", "shm"), ("daemon", "client")):
        assert by[t, "bfloat16", kv, "prefill"]["recv_bytes"] < by[t, "float32", kv, "prefill"]["recv_bytes"]
    # (msgpack's: over shm a daemon's decode P travels padded to the width its plans replay, 256 columns a head)
    decode_sent = {kv: by["msgpack", "float32", kv, "decode"]["sent_bytes"] for kv in ("client", "daemon")}
    assert decode_sent["client"] > decode_sent["daemon"]

    table = (out / "results.md").read_text()
    assert "shm vs msgpack" in table and table.count("\n| 8 |") >= len(configs)
    assert "per decoded token (ms)" in table
    assert (out / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for log in sorted(out.glob("*.log")):  # each run's log reads back with every call it made
        report = subprocess.run([sys.executable, "-m", "shmrt", "analyze", str(log), "--json"],
                                capture_output=True, text=True, timeout=60)
        assert report.returncode == 0, report.stderr
        calls = sum(run["calls"] for run in json.loads(report.stdout)["runs"])
        # Init, then a warm-up and 3 measured rounds, each a prefill and 2 decode steps
        assert calls == 1 + 4 * 3 * per_forward["client" if "client" in log.name else "daemon"], (log.name, calls)


def test_ab_summary_gives_each_variants_medians_and_its_wins_against_the_first(tmp_path):
    """bench/ab_summary.py over interleaved runs: per-token medians of the decode row, and rounds won."""
    def write(name, ms_per_token, daemon_ms):
        row = {"phase": "decode", "transport": "shm", "tokens": 10, "median_s": ms_per_token / 100,
               "enclave_s": 0.01, "stage_encode_s": 0.002, "stage_doorbell_s": 0.0002, "stage_wait_s": 0.005,
               "stage_decode_s": 0.002, "daemon_s": daemon_ms / 100, "floor_s": 0.15}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([{"phase": "prefill", "transport": "shm"}, row]))
    for round_, (old, new) in enumerate([(30, 27), (32, 33), (31, 28)], 1):
        write(f"old-{round_}", old, 12)
        write(f"new-{round_}", new, 11)
    out = subprocess.run([sys.executable, "bench/ab_summary.py", str(tmp_path), "old", "new"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")] for line in out[2:])}
    assert rows["old"][2] == "31.00" and rows["new"][2] == "28.00"       # medians of 30,32,31 and 27,33,28
    assert rows["new"][8] == "11.00" and rows["new"][10] == "2/3"
    # its ms/token over its floor (15 ms a token), round by round differences (-3, +1, -3), the sign test's p
    assert rows["new"][11:14] == ["1.87", "-3.00", "1.00"] and rows["old"][11:14] == ["2.07", "", ""]


def test_the_sign_test_of_ab_summary():
    sys.path.insert(0, "bench")
    try:
        from ab_summary import sign_test
    finally:
        sys.path.remove("bench")
    assert sign_test(3, 3) == 0.25 and sign_test(0, 3) == 0.25 and sign_test(4, 9) == 1.0
    assert abs(sign_test(9, 10) - 22 / 1024) < 1e-12 and sign_test(0, 0) == 1.0


def test_daemon_calls_times_every_method_through_the_handler_and_the_floor(tmp_path):
    """bench/daemon_calls.py (the daemon's per-call cost in process) runs against today's handler: its reply
    builder must offer what the handler asks of a transport's (a joined reply for q|k|v and gate|up)."""
    out = tmp_path / "calls.json"
    subprocess.run([sys.executable, "bench/daemon_calls.py", "--model", "tiny", "--threads", "1", "--context", "8",
                    "--steps", "2", "--warmup", "1", "--json", str(out)], capture_output=True, text=True, check=True,
                   timeout=120, env={**os.environ, "PYTHONPATH": "."})
    rows = json.loads(out.read_text())["results"]
    methods = [r["method"] for r in rows]
    assert methods == ["Embedding", "BatchLinear qkv", "Matmul QK^T (cache k)", "AttentionOutput (cache v)",
                       "BatchLinear o", "BatchLinear gate|up", "BatchLinear down", "LMHead"]
    for r in rows:   # 2 steps x 2 layers of each (the Embedding and LM head once per layer too, as the script times them)
        assert r["handler_n"] == r["floor_n"] == 4, r
        assert 0 < r["handler_p10_us"] <= r["handler_median_us"] <= r["handler_p90_us"], r
        assert 0 < r["floor_median_us"] and 0 < r["handler_cpu_median_us"], r


def _table(stdout: str, header: str) -> dict[str, list[str]]:
    """The rows after the line starting with `header`, by method (the first one or two words)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1:]:
        words = line.split()
        if words and words[0] in ("AttentionOutput", "AttentionScores", "BatchLinear", "Embedding", "LMHead", "Matmul"):
            name = " ".join(words[:2]) if words[0] == "BatchLinear" else words[0]
            rows[name] = words
    return rows


@pytest.mark.slow
def test_the_daemon_stage_probe_follows_todays_server_and_times_every_decode_call():
    """bench/daemon_stages.py stamps the server's serving steps by wrapping them: a real split (a daemon here, a client
    process), every kind of decode call in its table with its stages."""
    out = subprocess.run([sys.executable, "bench/daemon_stages.py", "tiny", "cpu", "16", "6"], capture_output=True,
                         text=True, check=True, timeout=240, env={**os.environ, "PYTHONPATH": "."})
    rows = _table(out.stdout, "method")
    assert set(rows) == {"AttentionOutput", "AttentionScores", "BatchLinear 48", "BatchLinear 64", "Embedding",
                         "LMHead"}, out.stdout
    for name, words in rows.items():
        calls, *stages = words[2:] if name.startswith("BatchLinear") else words[1:]
        assert int(calls) > 0 and all(float(v) >= 0 for v in stages) and float(stages[2]) > 0, (name, words)


def test_the_daemon_stage_probe_times_the_micro_suites_echo_calls():
    """Its `echo` mode: the micro suite's echo daemon, a client making 4 KiB round trips; the last round's every call."""
    out = subprocess.run([sys.executable, "bench/daemon_stages.py", "echo", "cpu", "4096", "300"], capture_output=True,
                         text=True, check=True, timeout=120, env={**os.environ, "PYTHONPATH": "."})
    rows = _table(out.stdout, "method")
    assert set(rows) == {"Matmul"}, out.stdout
    calls, *stages = rows["Matmul"][1:]
    assert int(calls) == 300 and all(float(v) >= 0 for v in stages) and float(stages[2]) > 0, rows


def test_the_graph_route_probe_times_the_handler_on_every_decode_call():
    out = subprocess.run([sys.executable, "bench/graph_route_calls.py", "tiny", "4"], capture_output=True, text=True,
                         check=True, timeout=120, env={**os.environ, "PYTHONPATH": "."})
    lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert {words[0] for words in lines} == {"AttentionOutput", "AttentionScores", "BatchLinear", "Embedding", "LMHead"}
    assert all(float(words[-2]) > 0 for words in lines), out.stdout


def test_micro_floors_move_the_bytes_across_processes(tmp_path):
    """The floors' round trips make the copies they stand for: the echo side (another process) leaves the client's
    bytes in the second shared area, over either signalling, at each size in turn."""
    import torch
    from conftest import CHILDREN
    from shmrt.tools.bench.micro import Floors, micro_cpus
    cpus = micro_cpus()
    echo_cpu = cpus[1] if cpus else None
    with Floors(CHILDREN, f"ipc://{tmp_path}/raw.sock", 2 * 65536 + 4096) as floors:
        floors.pin(echo_cpu)
        area = floors.area
        for signal in ("shm", "zmq"):
            for n in (4096, 65536, 1024):
                x = torch.randn(n // 4)
                round_trip = getattr(floors, signal)(x)
                for _ in range(3):
                    x.normal_()
                    round_trip()
                    echoed = area.ring.tensor(area.dst - area.ring.data_offset, n, torch.float32, (n // 4,))
                    assert torch.equal(echoed, x), (signal, n)
        if echo_cpu is not None:   # both echo sides' main threads run where they were put; ZeroMQ's threads do not
            assert [os.sched_getaffinity(p.pid) for p in floors.procs] == [{echo_cpu}] * 2
            raw = floors.procs[1].pid
            others = [int(tid) for tid in os.listdir(f"/proc/{raw}/task") if int(tid) != raw]
            assert others and all(os.sched_getaffinity(tid) == os.sched_getaffinity(0) for tid in others)


def test_micro_cpus_pick_two_cpus_that_are_not_smt_siblings(monkeypatch):
    from shmrt.tools.bench import micro
    assert micro._cpu_list("0-2,8\n") == {0, 1, 2, 8} and micro._cpu_list("5") == {5}
    monkeypatch.setattr(micro.os, "sched_getaffinity", lambda pid: {0, 1, 8, 9})
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: __import__("io").StringIO("0,8\n")
                        if "thread_siblings_list" in str(path) else real_open(path, *a, **k))
    assert micro.micro_cpus() == (0, 1)   # 8 is cpu 0's sibling; 1 is not
    monkeypatch.setattr(micro.os, "sched_getaffinity", lambda pid: {0, 8})
    assert micro.micro_cpus() == (0, 8)   # only its sibling left: that one
    monkeypatch.setattr(micro.os, "sched_getaffinity", lambda pid: {3})
    assert micro.micro_cpus() is None


def test_micro_interleaving_spreads_every_kinds_samples_over_all_rounds():
    """A kind with a tenth of the floor's repeats is sampled in every round beside it, not all in the first ones."""
    from shmrt.tools.bench.micro import _time_interleaved
    order = []
    kinds = {name: (lambda name=name: order.append(name)) for name in ("floor", "transport", "odd")}
    samples = _time_interleaved(kinds, {"floor": 2000, "transport": 200, "odd": 333}, warmup=0, block=100)
    assert {k: len(v) for k, v in samples.items()} == {"floor": 2000, "transport": 200, "odd": 333}
    assert order.count("floor") == 2000   # (no warm-up asked)
    floors_before = [order[:i].count("floor") for i, name in enumerate(order) if name == "transport"]
    assert floors_before[0] == 100 and floors_before[-1] == 2000   # the first in round 1, the last in round 20
    assert all(b - a in (0, 100) for a, b in zip(floors_before, floors_before[1:]))   # 10 a round, every round
