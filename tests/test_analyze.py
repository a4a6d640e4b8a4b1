"""The v2.4 log layout (writer) and `shmrt analyze` (reader, report, comparison, JSON, plot)."""
import json
import subprocess
import sys

import pytest

from conftest import repo_root, shmrt_argv
from shmrt.tools import analyze
from shmrt.tools.perflog import LINE_WIDTH, RULE, SUMMARY_KEYS, PerfLog, format_row, row_fields
from shmrt.wire.stats import CallStats

SAMPLE = repo_root() / "tests" / "data" / "zmq_performance_v2.4_sample.log"


def test_writer_layout_matches_the_v24_sample_exactly(tmp_path):
    sample = SAMPLE.read_text().splitlines()
    path = str(tmp_path / "x.log")
    log = PerfLog(path, "IPC", {})
    log(CallStats("Init", "msgpack", t_start=0, t_encoded=17_000, t_sent=29_000, t_replied=728_000,
                  t_decoded=780_000, sent_bytes=20, recv_bytes=10015))
    log.close()
    ours = open(path).read()
    lines = ours.splitlines()
    assert lines[:4] == sample[:4]                       # header, rules and column names to the byte
    assert all(len(l) == LINE_WIDTH == 144 for l in lines[2:5] if l != RULE)
    assert lines[4].split()[:2] == ["1", "Init"] and len(lines[4]) == 144
    summary = [l.split(":")[0] for l in lines if ":" in l and not l.startswith("ZeroMQ")]
    assert summary == list(SUMMARY_KEYS)
    assert lines[-1] == RULE and ours.endswith("\n") and lines[-12] == "SUMMARY"
    side = [json.loads(l) for l in open(path + ".jsonl")]
    assert side[0]["type"] == "run" and side[1]["method"] == "Init" and side[1]["t_replied_ns"] == 728_000


def test_row_formatting_reproduces_a_sample_row():
    row = format_row(row_fields(2, "Embedding", 0.013, 0.019, 1.794, 0.023, 1.857, int(1.05 * 1024), int(128.05 * 1024)))
    expected = SAMPLE.read_text().splitlines()[5]
    assert row[:118] == expected[:118] and len(row) == len(expected) == 144


def test_analyzer_splits_the_v24_sample_into_two_runs_and_matches_its_summary():
    runs = analyze.load(str(SAMPLE))
    assert [len(r.rows) for r in runs] == [27, 26]
    s = analyze.summarize(runs[-1])
    assert s["calls"] == 26
    # rows hold 3-decimal values, v2.4 averaged unrounded ones: agree to the last printed digit
    assert s["serialize_ms"] / 26 == pytest.approx(0.196, abs=1.5e-3)
    assert s["recv_ms"] / 26 == pytest.approx(1.711, abs=1.5e-3)
    assert s["total_ms"] / 26 == pytest.approx(2.147, abs=1.5e-3)
    assert round(s["sent_bytes"] / 2**20, 2) == 6.35 and round(s["recv_bytes"] / 2**20, 2) == 7.19
    assert round(s["throughput_mib_s"], 0) == 242


def shmrt(*args):
    return subprocess.run(shmrt_argv(*args), capture_output=True, text=True, timeout=120)


def test_real_runs_over_both_transports_read_back_compare_and_plot(tmp_path):
    logs = {}
    for t in ("msgpack", "shm"):
        logs[t] = tmp_path / f"{t}.log"
        r = shmrt("run", "--transport", t, "--prefill", "24", "--max-new-tokens", "3", "--log", str(logs[t]), "--quiet")
        assert r.returncode == 0, r.stderr
    calls = 1 + 3 * (2 * 4 + 2)  # Init + 3 forwards of the 2-layer tiny preset (4 calls per layer: fewest)
    r = shmrt("analyze", str(logs["msgpack"]), str(logs["shm"]), "--plot", str(tmp_path / "cmp.png"))
    assert r.returncode == 0, r.stderr
    for section in ("Overall", "Time breakdown", "By method", "Top 5 slowest", "Top 5 largest", "Recommendations",
                    "comparison"):
        assert section in r.stdout
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    r = shmrt("analyze", "--json", str(logs["msgpack"]), str(logs["shm"]))
    runs = json.loads(r.stdout)["runs"]
    assert [x["calls"] for x in runs] == [calls, calls]
    assert [x["transport"] for x in runs] == ["IPC", "SHM+IPC"]
    assert runs[0]["by_method"]["BatchLinear"]["calls"] == 3 * 2 * 2
    assert runs[0]["by_method"]["AttentionScores"]["calls"] == runs[0]["by_method"]["AttentionOutput"]["calls"] == 3 * 2
    for run in runs:   # the 2 decode steps, each kind of call named as the model makes it
        kinds = {m["label"]: m["calls"] for m in run["decode_calls"]}
        assert kinds == {"Embedding": 2, "AttentionScores": 4, "AttentionOutput": 4,
                         "BatchLinear gate|up": 4, "BatchLinear down": 4, "LMHead": 2}, kinds
        assert all(m["daemon_us"] > 0 and m["enclave_us"] > 0 for m in run["decode_calls"])
    assert "transport shm" in analyze.recommendations(analyze.summarize(analyze.load(str(logs["msgpack"]))[0]))[0] \
        or any("--transport shm" in x for x in analyze.recommendations(analyze.summarize(analyze.load(str(logs["msgpack"]))[0])))


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("", "empty file"),
    ("hello world\n", "not a zmq_performance.log"),
    ("\n".join(SAMPLE.read_text().splitlines()[:8]) + "\n9     BatchLinear          0.03", "truncated"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, content, message):
    path = tmp_path / "bad.log"
    if content is not None:
        path.write_text(content)
    r = shmrt("analyze", str(path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- the sidecar's breakdown (hand-made calls of test_breakdown.py: every stage known)

def breakdown_log(tmp_path):
    from test_breakdown import write_sidecar
    path = tmp_path / "hand.log"
    write_sidecar(path)
    return path


def analyze_args(*logs, plot=None, json_out=False):
    import argparse
    return argparse.Namespace(logs=[str(p) for p in logs], json=json_out, plot=plot and str(plot))


def test_report_shows_the_sidecar_breakdown_per_phase_and_stage(tmp_path, capsys):
    assert analyze.main(analyze_args(breakdown_log(tmp_path))) == 0
    out = capsys.readouterr().out
    lines = out[out.index("Where the time went"):].splitlines()
    #               tokens  wall   enclave transport daemon calls   (ms)
    assert lines[2].split() == ["prefill", "4", "10.000", "3.500", "3.000", "3.500", "2"]
    assert lines[3].split() == ["decode", "2", "10.000", "7.400", "1.400", "1.200", "2"]
    assert lines[4].split() == ["a", "token", "5.000", "3.700", "0.700", "0.600"]
    stages = out[out.index("Transport by stage"):].splitlines()
    assert stages[1].split() == ["phase", "encode", "doorbell", "wait", "decode", "daemon"]
    assert stages[2].split() == ["prefill", "0.700", "0.200", "1.500", "0.600", "3.500"]
    assert stages[3].split() == ["decode", "0.200", "0.200", "0.800", "0.200", "1.200"]


def test_report_shows_each_kind_of_decode_call_with_the_enclave_time_before_it(tmp_path, capsys):
    assert analyze.main(analyze_args(breakdown_log(tmp_path))) == 0
    out = capsys.readouterr().out
    lines = out[out.index("Decode, each kind of call"):].splitlines()
    assert lines[1].split() == ["call", "calls", "enclave", "encode", "doorbell", "wait", "decode", "daemon"]
    # the decode phase's two LM heads: 2.7 ms of enclave between them, then 0.1 + 0.1 + (1.0 - 0.6) + 0.1 ms
    assert lines[2].split() == ["LMHead", "2", "2700.0", "100.0", "100.0", "400.0", "100.0", "600.0"]


def test_json_carries_the_phases_when_there_is_a_sidecar(tmp_path, capsys):
    analyze.main(analyze_args(breakdown_log(tmp_path), SAMPLE, json_out=True))
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [p["phase"] for p in runs[0]["phases"]] == ["prefill", "decode"]
    assert runs[0]["phases"][1]["transport_s"] == pytest.approx(1.4e-3)
    assert all("phases" not in r for r in runs[1:])  # v2.4's sample has no sidecar


def test_v24_log_without_sidecar_reports_as_before(capsys):
    assert analyze.main(analyze_args(SAMPLE)) == 0
    out = capsys.readouterr().out
    assert "Time breakdown" in out and "Where the time went" not in out


def test_plot_splits_the_daemons_work_out_of_the_wait(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []
    real = analyze._stack
    monkeypatch.setattr(analyze, "_stack", lambda ax, labels, parts: drawn.append((labels, parts)) or
                        real(ax, labels, parts))
    png = tmp_path / "b.png"
    assert analyze.main(analyze_args(breakdown_log(tmp_path), SAMPLE, plot=png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (methods, by_stage), (v24_methods, v24_stages), (phases, by_part) = drawn
    assert [n for n, _ in by_stage] == ["encode", "doorbell", "wait", "daemon", "decode"]
    lm = methods.index("LMHead")
    assert dict((n, v[lm]) for n, v in by_stage) == pytest.approx(
        {"encode": 0.2, "doorbell": 0.2, "wait": 0.8, "daemon": 1.2, "decode": 0.2})
    assert [n for n, _ in v24_stages] == ["serialize", "send", "recv", "deserialize"]  # no sidecar: as before
    assert phases == ["1. prefill", "2. decode"]
    assert dict((n, v[0]) for n, v in by_part) == pytest.approx(
        {"enclave": 3.5, "encode": 0.7, "doorbell": 0.2, "wait": 1.5, "decode": 0.6, "daemon": 3.5})


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
    png = tmp_path / "x.png"
    code = ("import sys; sys.modules['matplotlib'] = None; from shmrt.cli import main; "
            f"sys.exit(main(['analyze', {str(SAMPLE)!r}, '--plot', {str(png)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "shmrt analyze: error: --plot needs matplotlib: pip install 'shmrt[plot]' (or pip install matplotlib)"]
    assert not png.exists()


def test_analyze_loads_neither_torch_nor_zmq():
    code = "import shmrt.tools.analyze, sys; assert 'torch' not in sys.modules and 'zmq' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
