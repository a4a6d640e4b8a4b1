"""The daemon's sessions under faults: concurrent clients, kill -9 on either side, silent clients,
wrong tokens, access rules. Real processes, sockets and shared memory throughout."""
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import zmq

from conftest import CHILDREN, shm_segments, shmrt_argv
from shmrt.tools.process import DaemonProcess
from shmrt.errors import PeerError, PeerTimeout, SetupError
from shmrt.wire.bell import BellOut
from shmrt.wire.peer import client_info
from shmrt.wire.registry import client_transport as make_client_transport
from shmrt.wire.ring import OFF_ASLEEP
from shmrt.wire.transport import check_endpoint



def _client_run(endpoint, seed, transport, q):
    from shmrt.enclave.client import EnclaveClient
    from shmrt.enclave.generate import Sampler, generate
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(seed))
    with EnclaveClient(endpoint=endpoint, transport=transport, timeout=60, prompt_tokens=24, total_tokens=30) as c:
        g = generate(c.model, ids, 5, Sampler())
    q.put((seed, g.prefill_logits.numpy(), g.tokens))  # numpy: no fd sharing with an exiting process


@pytest.mark.slow
def test_8_concurrent_clients_get_the_same_logits_as_each_alone(model_daemon):
    d = model_daemon("tiny")
    q = CHILDREN.Queue()
    procs = [CHILDREN.Process(target=_client_run, args=(d.endpoint, seed, "shm" if seed % 2 else "msgpack", q))
             for seed in range(8)]
    for p in procs:
        p.start()
    together = {}
    for _ in procs:
        seed, logits, tokens = q.get(timeout=240)
        together[seed] = (logits, tokens)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for seed in range(8):  # the same clients one at a time: identical results, no cross-talk
        _client_run(d.endpoint, seed, "shm", q)
        _, logits, tokens = q.get(timeout=60)
        assert (logits == together[seed][0]).all() and tokens == together[seed][1], seed


def _shmrt(*args, **kw):
    return subprocess.Popen(shmrt_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _wait_for_new_segments(before, proc, timeout=60):
    """The two rings `proc` created: new segments whose header names it as their owner (other test runs
    share /dev/shm and may create rings meanwhile)."""
    from shmrt.tools.cleanup import segment_owner
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = {name for name in shm_segments() - before if (segment_owner("/" + name) or (None,))[0] == proc.pid}
        if len(new) == 2:
            return new
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("client never created its rings")


def test_kill_9_daemon_mid_run_client_fails_within_timeout_and_unlinks(tmp_path):
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemon = DaemonProcess(["--model", "tiny"], endpoint, quiet=True)
    before = shm_segments()
    client = _shmrt("client", "--endpoint", endpoint, "--timeout", "2", "--prefill", "32",
                    "--max-new-tokens", "1900", "--log", str(tmp_path / "c.log"), "--quiet")
    try:
        ours = _wait_for_new_segments(before, client)
        time.sleep(0.5)                                   # mid-decode
        os.kill(daemon.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = client.communicate(timeout=30)
        detect = time.monotonic() - t0
    finally:
        client.kill()
        daemon.stop()
    print(f"client noticed the dead daemon after {detect:.2f} s")
    # Killed between calls, the next send finds no peer; killed inside one, the connection closes (or, where the
    # kernel's news comes late, the reply never comes)
    assert client.returncode == 2 and "Traceback" not in err
    assert any(m in err for m in ("the connection to the daemon at", "did not answer within 2 s",
                                  "no daemon is accepting connections")), err
    assert detect < 2 + 3
    assert not (ours & shm_segments()), "the client left its rings behind"
    with DaemonProcess(["--model", "tiny"], endpoint, quiet=True):  # a restarted daemon serves a new client
        ok = _shmrt("client", "--endpoint", endpoint, "--prefill", "8", "--max-new-tokens", "2", "--log", "")
        assert ok.wait(60) == 0, ok.communicate()


def test_kill_9_client_daemon_frees_its_session_and_rings_and_keeps_serving(model_daemon, tmp_path):
    d = model_daemon("tiny")
    before = shm_segments()
    client = _shmrt("client", "--endpoint", d.endpoint, "--prefill", "32", "--max-new-tokens", "1900",
                    "--log", "", "--quiet")
    ours = _wait_for_new_segments(before, client)
    time.sleep(0.5)
    os.kill(client.pid, signal.SIGKILL)
    client.wait()
    t0 = time.monotonic()
    while ours & shm_segments() and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    freed = time.monotonic() - t0
    print(f"daemon freed the dead client's session and rings after {freed:.2f} s")
    assert not (ours & shm_segments()) and freed < 2.5  # reaper runs every second
    with make_client_transport("shm", d.endpoint, timeout=5) as t:
        assert t.hello(client_info())["model"] == "tiny"


def test_silent_client_without_visible_pid_is_dropped_after_session_timeout(model_daemon):
    # An enclave client's pid means nothing to the host: only the idle timeout applies. The call after the
    # drop rings in shared memory, finds the dropped session marked asleep, sends a Wake and gets the
    # refusal over ZeroMQ at once (not after its 5 s timeout).
    d = model_daemon("tiny", "--session-timeout", "1")
    with make_client_transport("shm", d.endpoint, timeout=5, doorbell="shm") as t:
        t.hello({"wire_dtype": "float32"})
        t.open_session(1 << 20)
        t.call("Init").release()
        time.sleep(2.6)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="no open session"):
            t.call("LMHead", [torch.zeros(1, 64)])
        assert time.monotonic() - t0 < 2.5


# ---- the shared-memory doorbell: a daemon that dies or idles between the bells

def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _echo_session(endpoint: str, timeout: float):
    t = make_client_transport("shm", endpoint, timeout=timeout, doorbell="shm")
    t.hello(client_info())
    t.open_session(1 << 16)
    t.call("Init").release()
    return t


def _echoes(t, seed: int) -> bool:
    x = torch.randn(300, generator=torch.Generator().manual_seed(seed))
    with t.call("Embedding", [x]) as r:
        return torch.equal(r.tensors[0], x)


def test_idle_daemon_with_an_open_shm_doorbell_session_uses_no_cpu_and_wakes_for_the_next_call(echo_daemon):
    with _echo_session(echo_daemon.endpoint, timeout=10) as t:
        assert _echoes(t, 1)
        time.sleep(0.5)  # past DEEP_SLEEP_S: the daemon blocks on ZeroMQ
        pid = echo_daemon.proc.pid
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)
        share = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        print(f"idle daemon: {share * 100:.2f} % of a CPU (target 1 %)")
        assert share < 0.03, f"idle daemon used {share * 100:.1f} % of a CPU"
        t1 = time.monotonic()
        assert all(_echoes(t, seed) for seed in range(2, 6))  # the first of them finds it asleep: Wake
        assert time.monotonic() - t1 < 2.0


def test_a_busy_doorbell_session_skips_the_socket_and_a_new_client_is_still_served_at_once(tmp_path, monkeypatch):
    """Between two requests rung in shared memory the loop does not poll ZeroMQ (once per slice, or when the bell
    waiter sees the socket's descriptor readable); a Hello that comes meanwhile is served through the
    descriptor, long before the slice (stretched to 2 s here) would have brought the loop to the socket."""
    import threading

    from shmrt.host import server as server_module
    monkeypatch.setattr(server_module, "BELL_SLICE_NS", 2_000_000_000)
    endpoint = f"ipc://{tmp_path}/busy.sock"
    server = server_module.Server(endpoint, server_module.EchoHandler(), log=lambda m: None)
    polls = []
    poll_socket = server._poll_socket
    monkeypatch.setattr(server, "_poll_socket", lambda timeout_ms: polls.append(timeout_ms) or poll_socket(timeout_ms))
    stop = threading.Event()
    serving = threading.Thread(target=server.serve, kwargs={"until": stop.is_set, "poll_ms": 20})
    serving.start()
    try:
        with _echo_session(endpoint, timeout=10) as busy:
            assert _echoes(busy, 0)
            before = len(polls)
            assert all(_echoes(busy, seed) for seed in range(1, 201))
            assert len(polls) - before <= 2, f"{len(polls) - before} socket polls for 200 requests"
            latency = []

            def newcomer():
                start = time.monotonic()
                with _echo_session(endpoint, timeout=10) as t:
                    latency.append(time.monotonic() - start)
                    assert _echoes(t, 7)
            joining = threading.Thread(target=newcomer)
            joining.start()
            while joining.is_alive():   # the busy client keeps ringing while the newcomer says Hello and Attach
                assert _echoes(busy, 8)
            joining.join()
            assert latency and latency[0] < 1.0, latency
    finally:
        stop.set()
        serving.join(10)
        server.close()


def test_kill_9_daemon_mid_session_next_shm_doorbell_call_fails_and_close_unlinks(endpoint):
    """A daemon killed outright rings no goodbye; its connection closes with it: the next call says so at once, and
    the one after (the daemon still gone) too."""
    from conftest import EchoDaemon
    d = EchoDaemon(endpoint)
    timeout = 1.0
    try:
        t = _echo_session(endpoint, timeout=60)      # the daemon may still be starting
        t.timeout = timeout
        names = {t.req.name[1:], t.rsp.name[1:]}
        assert _echoes(t, 1)
        time.sleep(0.3)                               # idle: the daemon sleeps on ZeroMQ (asleep = 1)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.join(10)
        took = []
        for asleep in (1, 0):  # the call sends a Wake to nobody; then as if killed while awake (no Wake)
            t.req.native.store(OFF_ASLEEP, asleep)
            t0 = time.monotonic()
            with pytest.raises(PeerError, match="the connection to the daemon at .* closed"):
                _echoes(t, 2)
            took.append(time.monotonic() - t0)
        print(f"calls to the killed daemon failed after {took[0]:.2f} s (asleep) and {took[1]:.2f} s (awake)")
        assert all(s < timeout + 0.5 for s in took), took
        assert names <= shm_segments()
        t.close()
        assert not (names & shm_segments()), "the client left its rings behind"
    finally:
        d.stop()


def test_wrong_session_token_is_refused(model_daemon):
    d = model_daemon("tiny")
    with make_client_transport("shm", d.endpoint, timeout=5) as t:
        t.hello(client_info())
        t.open_session(1 << 20)
        t.call("Init").release()
        t.token = b"\x00" * 16
        t._bell_out = BellOut(t.req, t.token)   # the shm doorbell's requests carry the token its BellOut was given
        t.bind_caller()
        with pytest.raises(PeerError, match="token does not match"):
            t.call("LMHead", [torch.zeros(1, 64)])


def test_a_session_that_outgrows_its_kv_quota_is_refused_and_others_go_on(model_daemon):
    """tiny keeps 512 B of K/V per position (2 layers x K,V x 2 heads x 16 x fp32): a 0.25 MiB quota
    holds 512 positions. A longer prompt is refused with the sizes and the flag; a short one runs."""
    from shmrt.enclave.client import EnclaveClient
    from shmrt.enclave.generate import prefill
    d = model_daemon("tiny", "--max-kv-mib", "0.25")
    ids = torch.randint(0, 512, (1, 600), generator=torch.Generator().manual_seed(3))
    with EnclaveClient(endpoint=d.endpoint, prompt_tokens=600, total_tokens=600, timeout=30) as c:
        with pytest.raises(PeerError, match=r"K/V cache would reach 0\.2[5-9] MiB, more than the daemon allows per "
                                            r"session \(0\.25 MiB, --max-kv-mib\)"):
            prefill(c.model, ids)
    with EnclaveClient(endpoint=d.endpoint, prompt_tokens=500, total_tokens=500, timeout=30) as c:
        assert prefill(c.model, ids[:, :500]).shape == (1, 512)
    assert d.proc.poll() is None


def test_ipc_socket_private_and_tcp_loopback_only(model_daemon, tmp_path):
    d = model_daemon("tiny")
    assert stat.S_IMODE(os.stat(d.endpoint[len("ipc://"):]).st_mode) == 0o600
    from shmrt import settings
    assert stat.S_IMODE(settings.runtime_dir().stat().st_mode) == 0o700
    with pytest.raises(SetupError, match="loopback only"):
        check_endpoint("tcp://0.0.0.0:5555", bind=True)
    assert check_endpoint("tcp://0.0.0.0:5555", bind=True, allow_remote=True)
    # tiny: the daemon loads its model before it binds, and the default one (SmolLM2) takes ~10 s here
    r = subprocess.run([sys.executable, "-m", "shmrt", "daemon", "--model", "tiny", "--endpoint", "tcp://0.0.0.0:5599"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--allow-remote" in r.stderr


def _create_and_die(q):
    from shmrt.wire.ring import Ring
    ring = Ring.create(1 << 16, "req")
    q.put(ring.name)
    q.close()
    q.join_thread()  # flush before dying: os._exit skips the queue's feeder thread
    os._exit(0)  # no cleanup: the segment outlives its owner


def test_cleanup_removes_only_segments_of_dead_owners(tmp_path):
    from shmrt.wire.ring import Ring
    q = CHILDREN.Queue()
    p = CHILDREN.Process(target=_create_and_die, args=(q,))
    p.start()
    dead = q.get(timeout=30)
    p.join(10)
    with Ring.create(1 << 16, "rsp") as live:
        dry = subprocess.run([sys.executable, "-m", "shmrt", "cleanup", "--dry-run"], capture_output=True, text=True)
        assert f"would remove {dead}" in dry.stdout and live.name not in dry.stdout
        assert os.path.exists(f"/dev/shm{dead}")
        real = subprocess.run([sys.executable, "-m", "shmrt", "cleanup"], capture_output=True, text=True)
        assert f"removed {dead}" in real.stdout
        assert not os.path.exists(f"/dev/shm{dead}") and os.path.exists(f"/dev/shm{live.name}")


def test_ctrl_c_on_run_stops_both_processes_and_leaves_no_segment(tmp_path):
    before = shm_segments()
    # As from a terminal: SIGINT at its default. A runner that starts the suite in the background (a
    # non-interactive shell's `&`) hands it down ignored, and Python then keeps ignoring it, as it should.
    run = _shmrt("run", "--prefill", "32", "--max-new-tokens", "1900", "--log", "", start_new_session=True,
                 env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ours = _wait_for_new_segments(before, run)
    time.sleep(0.5)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    try:
        _, err = run.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # show where each process is
        os.killpg(run.pid, signal.SIGABRT)
        _, err = run.communicate(timeout=30)
        pytest.fail(f"shmrt run did not stop within 30 s of Ctrl-C; its stacks:\n{err[-6000:]}")
    assert run.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (ours & shm_segments())
    with pytest.raises(ProcessLookupError):  # nothing of the group is left running
        os.killpg(run.pid, 0)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):   # exited, not yet reaped by its (dead) parent
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_run_killed_alone_takes_its_daemon_and_segments_with_it(how):
    """`kill` (SIGTERM) or `kill -9` of `shmrt run` only (a job controller, `timeout`), not of its group: SIGTERM
    unwinds as Ctrl-C does (exit 143, one line); after SIGKILL the daemon gets SIGTERM from the kernel (its parent
    died) and stops, unlinking the dead client's rings. Neither leaves a daemon running or a segment behind."""
    before = shm_segments()
    run = _shmrt("run", "--prefill", "32", "--max-new-tokens", "1900", "--log", "", start_new_session=True)
    try:
        ours = _wait_for_new_segments(before, run)
        (daemon,) = _children(run.pid)
        time.sleep(0.3)
        os.kill(run.pid, how)
        _, err = run.communicate(timeout=30)
        if how == signal.SIGTERM:
            assert run.returncode == 143 and err.strip().splitlines()[-1] == "shmrt run: terminated", err
            assert "Traceback" not in err
        assert _gone_within(daemon, 15), f"daemon {daemon} still running after shmrt run got signal {how}"
        deadline = time.monotonic() + 10
        while ours & shm_segments() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (ours & shm_segments())
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_daemon_started_on_a_worker_thread_outlives_that_thread(tmp_path):
    """The kernel's parent-death signal follows the thread that started a child: a DaemonProcess started on a thread
    that then ends (the test suite's background start of SmolLM2) must go on serving."""
    import threading
    box = {}
    starter = threading.Thread(target=lambda: box.update(
        daemon=DaemonProcess(["--model", "tiny"], f"ipc://{tmp_path}/d.sock", quiet=True)))
    starter.start()
    starter.join()
    daemon = box["daemon"]
    try:
        time.sleep(0.5)
        assert daemon.proc.poll() is None
        t = make_client_transport("shm", daemon.endpoint, timeout=10)
        try:
            assert t.hello(client_info())["model"] == "tiny"
        finally:
            t.close()
    finally:
        daemon.stop()


def _in_small_dev_shm(script: str, mib: int = 1) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace whose /dev/shm is a fresh `mib`-MiB tmpfs."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root or CAP_SYS_ADMIN) to mount a small /dev/shm")
    return subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount -t tmpfs -o size={mib}m,mode=1777 tmpfs /dev/shm && {script}"],
                          capture_output=True, text=True, timeout=120)


def test_run_with_a_dev_shm_too_small_for_its_rings_fails_at_startup_naming_both_sizes(tmp_path):
    """A real 1 MiB /dev/shm, the whole `shmrt run`: one clear line, exit 2, the daemon stopped, nothing left.
    On tiny: the rings of any model's short run are the 1 MiB minimum plus the header (1028 KiB), and the
    default model's daemon would spend ~15 s loading SmolLM2 before the client finds no room for them."""
    r = _in_small_dev_shm(f"{sys.executable} -m shmrt run --model tiny --endpoint ipc://{tmp_path}/d.sock --quiet; "
                          "echo rc=$?; ls /dev/shm | wc -l")
    rc_line, leftovers = r.stdout.strip().splitlines()[-2:]
    assert rc_line == "rc=2" and leftovers == "0", r.stdout + r.stderr  # 2: the CLI's "error" exit code
    assert "Traceback" not in r.stderr
    assert re.search(r"^shmrt run: error: /dev/shm has 10\d\d KiB free but the ring needs 10\d\d KiB: .*--ring-mib$",
                     r.stderr, re.M), r.stderr


def test_reservation_catches_enospc_even_when_free_space_looked_sufficient():
    """The second line of defence: statvfs can race with other users of /dev/shm. Skip the statvfs check,
    and posix_fallocate must still fail at creation with ENOSPC (never a SIGBUS on first touch later)."""
    code = ("import shmrt.wire.ring as r, os; r._shm_free_bytes = lambda: None\n"
            "try:\n    r.Ring.create(4 << 20, 'req')\nexcept r.SetupError as e:\n    print('SetupError:', e)\n"
            "print('left', len(os.listdir('/dev/shm')))")
    r = _in_small_dev_shm(f"{sys.executable} -c \"{code}\"")
    assert r.returncode == 0, r.stderr
    assert "SetupError: could not reserve 4100 KiB in /dev/shm" in r.stdout and "left 0" in r.stdout, r.stdout


def test_a_dropped_clients_last_messages_are_refused_without_another_log_line(threaded_echo):
    """`shmrt run` after an error printed the daemon's "refused a new client" for the client's own Close: the drop
    is logged once; a stranger's message still is."""
    from shmrt.wire import protocol
    endpoint, logs = threaded_echo
    with make_client_transport("shm", endpoint, timeout=5) as t:
        t.hello(client_info())
        t.open_session(1 << 16)
        t.call("Init").release()
        with pytest.raises(PeerError, match="Init sent twice"):
            t.call("Init")
        with pytest.raises(PeerError, match="no open session"):
            t.call("Matmul", [torch.ones(4)])   # rung in the ring of a session the daemon dropped: a Wake, refused
    time.sleep(0.3)   # the Close that `with` sent
    assert sum("closed: Init sent twice" in m for m in logs) == 1, logs
    assert not any("refused" in m for m in logs), logs
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(endpoint)
    stranger.send(protocol.encode(protocol.Doorbell(protocol.Method.Matmul, 4, b"x" * 16)))
    assert stranger.poll(5000) and b"no open session" in stranger.recv()
    stranger.close()
    assert any("refused a new client" in m for m in logs), logs
