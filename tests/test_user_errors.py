"""What a user gets for a mistake or a clash: one line naming the flag, the variable or the endpoint, before
anything runs where that can be known, and never a takeover, a silent wait or a traceback (found by a user-level
sweep of the CLI: each test is one of its findings)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from shmrt.cli import sampling_temperature
from shmrt.errors import PeerError, SetupError, ShmrtError
from shmrt.host.server import EchoHandler, Server
from shmrt.tools.analyze import load, summarize
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport


def _shmrt(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmrt", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# ---- a daemon's endpoint

def test_a_second_daemon_on_a_live_ipc_endpoint_is_refused_and_the_first_keeps_its_clients(threaded_echo):
    """ZeroMQ's bind replaces what lies at an ipc:// path: unchecked, a second daemon took the first one's clients
    and, stopping, removed its socket (tcp:// refuses a second listener in the kernel)."""
    endpoint, _ = threaded_echo
    with pytest.raises(ShmrtError, match="another process .* is listening there"):
        Server(endpoint, EchoHandler(), log=lambda m: None)
    t = client_transport("shm", endpoint, timeout=30)
    try:
        t.hello(client_info())
        t.open_session(1 << 16)
        t.call("Init").release()
        with t.call("Matmul", [torch.arange(5.0)]) as reply:   # served by the first, whose socket is still there
            assert torch.equal(reply.view(0), torch.arange(5.0))
    finally:
        t.close()


def test_a_stale_socket_file_is_replaced_and_other_files_are_left_alone(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))   # bound, never listening, closed: what a daemon killed outright leaves
    s.close()
    with Server(f"ipc://{stale}", EchoHandler(), log=lambda m: None):
        assert stale.is_socket()
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    with pytest.raises(ShmrtError, match="not a socket"):
        Server(f"ipc://{plain}", EchoHandler(), log=lambda m: None)
    assert plain.read_text() == "mine"
    with pytest.raises(ShmrtError, match=f"directory {tmp_path}/missing does not exist"):
        Server(f"ipc://{tmp_path}/missing/d.sock", EchoHandler(), log=lambda m: None)


# ---- msgpack: the client's reply bound reaches the daemon

def test_msgpack_a_result_past_the_clients_reply_bound_is_refused_in_words_not_dropped(model_daemon):
    """The client bounds a msgpack reply by its --ring-mib (ZeroMQ drops a larger message unseen); the daemon learns
    that bound at Hello and refuses the call at once, naming the flag, instead of a reply the client never sees
    and a wait for --timeout."""
    from shmrt.enclave.client import EnclaveClient
    from shmrt.enclave.generate import prefill
    daemon = model_daemon("tiny")
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    start = time.monotonic()
    with EnclaveClient(endpoint=daemon.endpoint, model="tiny", transport="msgpack", timeout=60, prompt_tokens=300,
                       total_tokens=301, ring_mib=0.25) as client, torch.inference_mode():
        with pytest.raises(PeerError, match=r"more than the reply can carry \(65536\).*--ring-mib"):
            prefill(client.model, ids)
    assert time.monotonic() - start < 30, "the refusal waited for the timeout"


def test_msgpack_a_hello_with_a_reply_bound_that_makes_no_sense_is_refused(threaded_echo):
    endpoint, logs = threaded_echo
    t = client_transport("msgpack", endpoint, timeout=30, max_reply_bytes=-5)
    try:
        with pytest.raises(PeerError, match="max_reply_bytes -5"):
            t.hello(client_info())
    finally:
        t.close()


# ---- flags and settings: refused before anything starts, the flag named

@pytest.mark.parametrize("argv, says", [
    (["--ring-mib", "nan"], "argument --ring-mib: expected a positive number, got 'nan'"),
    (["--ring-mib", "-1"], "argument --ring-mib: expected a positive number"),
    (["--ring-mib", "inf"], "argument --ring-mib: expected a positive number"),
    (["--temperature", "nan"], "argument --temperature: expected a number >= 0"),
    (["--top-p", "0"], "argument --top-p: expected a probability in (0, 1]"),
    (["--top-p", "1.5"], "argument --top-p: expected a probability in (0, 1]"),
    (["--decode-threads", "-1"], "argument --decode-threads: expected a thread count >= 0"),
    (["--timeout", "0"], "argument --timeout: expected a positive number"),
    (["--logits-out", "/nonexistent/x.npy"], "--logits-out /nonexistent/x.npy: directory /nonexistent does not exist"),
    (["--log", "/nonexistent/run.log"], "--log /nonexistent/run.log: directory /nonexistent does not exist"),
])
def test_a_bad_flag_is_one_line_naming_it_before_a_daemon_starts(argv, says, tmp_path):
    out = _shmrt("run", "--model", "tiny", "--prefill", "4", "--endpoint", f"ipc://{tmp_path}/d.sock", *argv)
    assert out.returncode == 2, out
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "shmrt daemon" not in out.stderr   # refused before one started
    assert not list(tmp_path.iterdir())


def test_an_output_path_that_is_a_directory_is_refused(tmp_path):
    out = _shmrt("run", "--model", "tiny", "--prefill", "4", "--logits-out", f"{tmp_path}/")
    assert out.returncode == 2 and "--logits-out" in out.stderr and "is a directory" in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("env, says", [
    ({"SHMRT_TIMEOUT": "abc"}, "SHMRT_TIMEOUT='abc': expected a positive number of seconds"),
    ({"SHMRT_TIMEOUT": "-3"}, "SHMRT_TIMEOUT='-3': expected a positive number of seconds"),
    ({"SHMRT_BACKOFF": "1,2"}, "SHMRT_BACKOFF='1,2': expected four non-negative microsecond values"),
])
def test_a_bad_setting_in_the_environment_is_one_line_and_leaves_no_socket(env, says, tmp_path):
    out = _shmrt("run", "--model", "tiny", "--prefill", "4", "--log", "", "--endpoint", f"ipc://{tmp_path}/d.sock",
                 env=env)
    assert out.returncode == 2, out
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list(tmp_path.iterdir()), "a socket file was left behind"


def test_settings_refuse_what_is_not_a_positive_finite_number(monkeypatch):
    from shmrt import settings
    for value in ("abc", "nan", "inf", "0", "-1"):
        monkeypatch.setenv("SHMRT_MAX_REPLY_MIB", value)
        with pytest.raises(SetupError, match="SHMRT_MAX_REPLY_MIB"):
            settings.max_reply_bytes()
    monkeypatch.setenv("SHMRT_MAX_REPLY_MIB", "0.5")
    assert settings.max_reply_bytes() == 1 << 19


def test_top_p_alone_samples_as_the_readme_says_and_temperature_zero_stays_greedy():
    assert sampling_temperature(None, 1.0) == 0.0     # nothing asked: greedy
    assert sampling_temperature(None, 0.9) == 1.0     # --top-p alone: nucleus sampling of the logits as they are
    assert sampling_temperature(0.0, 0.9) == 0.0      # asked for greedy: greedy
    assert sampling_temperature(0.7, 1.0) == 0.7


# ---- the analyzer on what a run that died leaves

def _log(tmp_path, sidecar_lines: list[str]) -> str:
    path = tmp_path / "run.log"
    path.write_text("ZeroMQ Performance Log - Transport: SHM+IPC\n"
                    "1 LMHead 0.01 0.01 0.5 0.01 0.53 1.0 2.0 10.0\n")
    (tmp_path / "run.log.jsonl").write_text("\n".join(sidecar_lines) + "\n")
    return str(path)


def _call(i: int, method: str, phase: str, start: int) -> str:
    return ('{"type":"call","id":%d,"method":"%s","layer":-1,"op":0,"phase":"%s","transport":"shm","t_start_ns":%d,'
            '"t_encoded_ns":%d,"t_sent_ns":%d,"t_replied_ns":%d,"t_decoded_ns":%d,"sent_bytes":64,"recv_bytes":64,'
            '"payload_sent":0,"payload_recv":0,"copy_in_ns":0,"daemon_work_ns":500}'
            % (i, method, phase, start, start + 100, start + 200, start + 900, start + 1000))


def test_analyze_reports_a_phase_the_run_did_not_live_to_end_from_its_calls(tmp_path, capsys):
    """A run killed in its decode writes no decode record (phases are recorded as they end): the decode calls are
    there, and the report shows their span, marked, with a step per LMHead, instead of leaving decode out."""
    calls = [_call(1, "Embedding", "prefill", 0), _call(2, "LMHead", "prefill", 2000)]
    calls += [_call(3 + i, m, "decode", 10_000 + 2000 * i) for i, m in enumerate(["Embedding", "LMHead"] * 3)]
    path = _log(tmp_path, ['{"type":"run","label":"SHM+IPC"}', *calls,
                           '{"type":"phase","phase":"prefill","start_ns":0,"end_ns":5000,"tokens":4}'])
    s = summarize(load(path)[-1])
    decode = [p for p in s["phases"] if p["phase"] == "decode"]
    assert len(decode) == 1 and decode[0]["cut_short"] and decode[0]["tokens"] == 3 and decode[0]["calls"] == 6
    assert decode[0]["wall_s"] == pytest.approx((21_000 - 10_000) / 1e9)   # first start to last end
    assert [p["phase"] for p in s["phases"]] == ["prefill", "decode"] and "cut_short" not in s["phases"][0]
    from shmrt.tools.analyze import format_breakdown
    assert any("decode: the run ended before this phase did" in line for line in format_breakdown(s))


def test_analyze_skips_sidecar_lines_that_are_not_utf8_or_lack_their_fields(tmp_path):
    good = _call(1, "LMHead", "prefill", 0)
    path = _log(tmp_path, ['{"type":"call"}', '{"type":"phase","phase":"decode"}', good])
    with open(path + ".jsonl", "ab") as f:
        f.write(bytes(range(128, 256)) + b"\n")
    s = summarize(load(path)[-1])
    assert s["method_stages"]["LMHead"]["calls"] == 1
    assert [p["phase"] for p in s["phases"]] == ["prefill"] and s["phases"][0]["cut_short"]


def test_a_daemon_refuses_a_live_endpoint_and_a_bad_setting_before_it_loads_its_model(threaded_echo, tmp_path):
    """Loading takes minutes on a real model (and a second copy of the weights on a device): what can refuse the
    daemon is asked first."""
    endpoint, _ = threaded_echo
    out = _shmrt("daemon", "--model", "tiny", "--endpoint", endpoint)
    assert out.returncode == 2 and "is listening there" in out.stderr and "loaded" not in out.stderr, out.stderr
    out = _shmrt("daemon", "--model", "tiny", "--endpoint", f"ipc://{tmp_path}/d.sock", env={"SHMRT_BACKOFF": "1"})
    assert out.returncode == 2 and "SHMRT_BACKOFF='1'" in out.stderr and "loaded" not in out.stderr, out.stderr
    assert not (tmp_path / "d.sock").exists()


def test_a_busy_or_unreadable_listener_is_not_taken_for_a_stale_one(tmp_path, monkeypatch):
    """Only a refused connection means nobody listens: any other failure of the probe (a full backlog answers
    EAGAIN at once) is a refusal too, not a takeover."""
    from shmrt.host import server
    path = tmp_path / "busy.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))

    class Busy(socket.socket):
        def connect(self, address):
            raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(server.socket, "socket", Busy)
    try:
        with pytest.raises(ShmrtError, match="cannot tell whether another process listens there"):
            server.check_ipc_free(str(path))
    finally:
        s.close()


def test_a_tiny_temperature_samples_the_largest_logit_instead_of_failing():
    from shmrt.enclave.generate import Sampler
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    assert Sampler(1e-300, 1.0, seed=3)(logits).tolist() == [1, 0]
    assert Sampler(1e-300, 0.5, seed=3)(logits).tolist() == [1, 0]


@pytest.mark.parametrize("transport,doorbell", [("shm", "shm"), ("shm", "zmq"), ("msgpack", None)])
def test_a_client_hears_that_its_daemon_stopped_instead_of_waiting_out_its_timeout(endpoint, transport, doorbell):
    """A daemon that stops (SIGTERM, Ctrl-C) rings a goodbye in each shm doorbell session's response ring: the
    client's next call ends with that line at once (before: it waited its whole --timeout and blamed a silent
    daemon). The same Error goes over ZeroMQ to every client, but ZeroMQ drops what a client had not read when the
    daemon's connection closes: a msgpack or ZeroMQ-doorbell client hears the goodbye where it came in time, else
    the connection close (ZeroMQ's monitor), at once too."""
    import threading
    stop, ready = threading.Event(), threading.Event()

    def serve():
        with Server(endpoint, EchoHandler(), log=lambda m: None) as server:
            ready.set()
            server.serve(until=stop.is_set, poll_ms=20)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    t = client_transport(transport, endpoint, timeout=60, doorbell=doorbell)
    try:
        t.hello(client_info())
        t.open_session(1 << 16)
        t.call("Init").release()
        stop.set()
        thread.join(10)
        start = time.monotonic()
        with pytest.raises(PeerError, match="the daemon stopped|the connection to the daemon at .* closed"):
            t.call("Matmul", [torch.ones(4)]).release()
        assert time.monotonic() - start < 10
    finally:
        t.close()


def test_small_things_a_user_can_get_wrong_get_a_line_that_says_what(tmp_path):
    from shmrt.errors import ModelError
    from shmrt.model.checkpoint import resolve_model
    from shmrt.wire.transport import check_endpoint
    with pytest.raises(SetupError, match="999.1.1.1 is not an IP address"):
        check_endpoint("tcp://999.1.1.1:5555")
    assert check_endpoint("tcp://127.0.0.1:5555") and check_endpoint("tcp://[::1]:5555")
    assert check_endpoint("tcp://localhost:5555") and check_endpoint("tcp://gpu-host:5555")   # names: ZeroMQ resolves
    with pytest.raises(ModelError, match=r"has no config.json.*smollm2-135m"):
        resolve_model(str(tmp_path), None, 0)
    out = _shmrt("run", "--model", "tiny", "--token-ids", "1,,2", "--max-new-tokens", "1")
    assert out.returncode == 2 and "token ids must be integers" in out.stderr, out.stderr
