"""The real `shmrt client` against a hostile host: tests/hostile_host.py sits between the client and a
real `shmrt daemon --model tiny` and corrupts one reply field or one host-owned resource per case.

Every case must end the way a user can act on: exit 2 with exactly one line on stderr starting with
"shmrt client: error:" (or exit 0 where the corruption is harmless), no traceback, no control
characters in the output, none of the client's segments left in /dev/shm, and an exit within the
timeout plus a few seconds of the corruption. The clients of all cases run a few at a time (the module fixture), then each
case's outcome is checked by its own parametrized test. Each client is its own process running
`python -m shmrt client ...`, forked from tests/cli_zygote.py, which has imported torch once for all
of them (the interpreter start and the imports are the same in every case, and other tests launch the
CLI from scratch); the daemons and the hostile hosts are started from scratch.

Transports: `shm` is the product's default (the shm doorbell: RPC doorbells in the rings' headers, only
Hello, Attach, Close and Wake over ZeroMQ); `shm-zmqbell` is `--transport shm --doorbell zmq`, where every
reply passes the proxy, so its reply-field and resource cases reach the same decoder and rings; the
`@bell` cases write the shm doorbell's header words themselves (hostile_host.BELL_RULES).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import secrets
import subprocess
import sys
import time

import pytest

from cli_zygote import Zygote
from conftest import repo_root

TIMEOUT = 3.0
AFTER_FIRE = TIMEOUT + 7.0  # corruption to exit: --timeout at most, plus teardown (slow on a loaded 2-core box)
HANG_GUARD = 120.0          # the whole client run
PARALLEL = 4
CLIENT_ARGS = ["--model", "tiny", "--prefill", "4", "--max-new-tokens", "2", "--timeout", str(TIMEOUT), "--log", ""]
PROXY = pathlib.Path(__file__).with_name("hostile_host.py")

# (transport, rule, expected exit code, what stderr must mention)
RING = "ring /shmrt-"
TIMED_OUT = "did not answer"
# A connection ZeroMQ drops (a message past the client's size limit) or the host closes: the client hears it at once
# (ZeroMQ's monitor, wire/transport.py) where it waited out its --timeout before
CLOSED = "the connection to the daemon at"
# A forged record and the daemon's reply written into the slot at once may interleave (one's length word,
# the other's bytes): rarely (a microsecond window per call), the client then reads a record that fails
# another of the decoder's checks or the client's. Neither record can fail the other case's check (the
# forged magic is the only bad magic, the forged token the only bad token).
BELL_TORN = ("doorbell is", "doorbell version", "doorbell method", "doorbell flags", "doorbell seq",
             "doorbell layer", "doorbell pos", "doorbell ntensors", "doorbell text", ".dtype code", ".ndim",
             ".shape", ".offset", "lies outside", "reply seq", "reply method", "message end")
BELL_TOKENS = "40"  # --max-new-tokens of the bell-* cases: calls enough for the host to win a race (~480)
CASES = [
    # ---- shm: each doorbell field of a reply (the RPC replies over ZeroMQ, where the proxy sees them)
    ("shm-zmqbell", "magic@rpc", 2, "magic"),
    ("shm-zmqbell", "version@rpc", 2, "version"),
    ("shm-zmqbell", "method-unknown@rpc", 2, "method"),
    ("shm-zmqbell", "method-other@rpc", 2, "method"),
    ("shm-zmqbell", "flags-unknown@rpc", 2, "flags"),
    ("shm-zmqbell", "flags-error@rpc", 2, "daemon at"),
    ("shm-zmqbell", "seq@rpc", 2, "seq"),
    ("shm-zmqbell", "token@rpc", 2, "token"),
    ("shm-zmqbell", "ring_end@rpc", 2, "message end"),
    ("shm-zmqbell", "work_ns@rpc", 0, None),
    ("shm-zmqbell", "ntensors-max@rpc", 2, "ntensors"),
    ("shm-zmqbell", "ntensors-plus1@rpc", 2, "bytes, expected"),
    ("shm-zmqbell", "text_len@rpc", 2, "bytes, expected"),
    ("shm-zmqbell", "truncated@rpc", 2, "at least"),
    ("shm-zmqbell", "desc-offset-unaligned@rpc", 2, "offset"),
    ("shm-zmqbell", "desc-offset-outside@rpc", 2, "outside"),
    ("shm-zmqbell", "desc-nbytes@rpc", 2, "nbytes"),
    ("shm-zmqbell", "desc-dtype@rpc", 2, "dtype"),
    ("shm-zmqbell", "desc-ndim@rpc", 2, "ndim"),
    ("shm-zmqbell", "desc-shape@rpc", 2, "shape"),
    ("shm-zmqbell", "text-control@rpc", 0, None),
    ("shm", "seq@hello", 2, "seq"),
    ("shm", "text-deep-json@hello", 2, "levels deep"),
    ("shm", "model-name-control@hello", 0, None),
    ("shm", "config-huge-int@hello", 0, None),        # a config from the host is ignored: the enclave has its own
    ("shm", "digest-other@hello", 2, "serves another model"),
    ("shm", "config-nan@hello", 2, "not valid JSON"),
    ("shm", "config-inf@hello", 2, "not valid JSON"),
    ("shm", "config-wrong-type@hello", 0, None),
    ("shm", "config-deep@hello", 2, "levels deep"),
    ("shm-zmqbell", "error-control@rpc", 2, "daemon at"),
    ("shm", "error-newlines@hello", 2, "daemon at"),
    ("shm-zmqbell", "error-8mb@rpc", 2, CLOSED),
    ("shm-zmqbell", "oversize@rpc", 2, CLOSED),
    # ---- shm: host-owned resources
    ("shm-zmqbell", "truncate-req@init", 2, RING),
    # the daemon writes the next reply first: the truncation kills the host's own daemon (SIGBUS) and the
    # client, whose ring was never touched after it, times out cleanly instead
    ("shm-zmqbell", "truncate-rsp@init", 2, (RING, TIMED_OUT)),
    ("shm-zmqbell", "truncate-req@rpc", 2, RING),
    ("shm-zmqbell", "truncate-rsp@rpc", 2, RING),
    ("shm-zmqbell", "truncate-req@decode", 2, RING),
    ("shm-zmqbell", "truncate-rsp@decode", 2, RING),
    ("shm-zmqbell", "grow-req@rpc", 0, None),
    ("shm-zmqbell", "grow-rsp@decode", 0, None),
    ("shm-zmqbell", "replace-req@rpc", 0, None),
    ("shm-zmqbell", "replace-rsp@decode", 0, None),
    ("shm-zmqbell", "close@rpc", 2, CLOSED),
    ("shm", "stall@hello", 2, TIMED_OUT),
    ("shm-zmqbell", "stall@decode", 2, TIMED_OUT),
    # ---- shm doorbell: the host writes the rings' header words while the calls go on. It races the daemon
    # (whichever rings a reply first is read), so the rule runs on every call until one of its lands.
    ("shm", "bell-seq@bell", 2, "doorbell sequence word"),
    ("shm", "bell-length@bell", 2, "doorbell record length"),
    ("shm", "bell-magic@bell", 2, ("doorbell magic b'XXXX'", *BELL_TORN)),
    ("shm", "bell-token@bell", 2, ("reply token does not match", *BELL_TORN)),
    ("shm", "asleep-1@bell", 0, None),   # a Wake with every call: harmless
    # ---- msgpack: each key of a reply, its types, nesting, huge ints, NaN
    ("msgpack", "method@rpc", 2, "method"),
    ("msgpack", "method-type@rpc", 2, "method"),
    ("msgpack", "method-missing@rpc", 2, "method"),
    ("msgpack", "seq@rpc", 2, "seq"),
    ("msgpack", "seq-type@rpc", 2, "seq"),
    ("msgpack", "error-type@rpc", 2, "daemon at"),
    ("msgpack", "error-deep@rpc", 2, "levels deep"),
    ("msgpack", "error-control@rpc", 2, "daemon at"),
    ("msgpack", "error-8mb@rpc", 2, CLOSED),
    ("msgpack", "work_ns@rpc", 0, None),
    ("msgpack", "work_ns-nan@rpc", 2, "work_ns"),
    ("msgpack", "text-type@rpc", 2, "text"),
    ("msgpack", "text-deep@rpc", 2, "levels deep"),
    ("msgpack", "tensors-type@rpc", 2, "tensors"),
    ("msgpack", "tensors-many@rpc", 2, "tensors"),
    ("msgpack", "tensor-dtype@rpc", 2, "dtype"),
    ("msgpack", "tensor-shape@rpc", 2, "shape"),
    ("msgpack", "tensor-data@rpc", 2, "nbytes"),
    ("msgpack", "tensor-extra-key@rpc", 2, "keys"),
    ("msgpack", "extra-key@rpc", 0, None),
    ("msgpack", "not-a-map@rpc", 2, "map"),
    ("msgpack", "garbage@decode", 2, "msgpack"),
    ("msgpack", "hello-deep-json@hello", 2, "levels deep"),
    ("msgpack", "model-name-control@hello", 0, None),
    ("msgpack", "config-huge-int@hello", 0, None),
    ("msgpack", "digest-other@hello", 2, "serves another model"),
    ("msgpack", "config-nan@hello", 2, "not valid JSON"),
    ("msgpack", "oversize@hello", 2, CLOSED),
    ("msgpack", "oversize@rpc", 2, CLOSED),
    ("msgpack", "close@rpc", 2, CLOSED),
    ("msgpack", "stall@decode", 2, TIMED_OUT),
]


def case_id(case) -> str:
    return f"{case[0]}-{case[1].replace('@', '-at-')}"  # -k cannot take "@"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def run_case(case, daemon_endpoint, workdir: pathlib.Path, zygote: Zygote) -> dict:
    """One case: the hostile host in front of the daemon, then the client through it. `daemon_endpoint` may
    be a callable that starts the case's own daemon (the truncate cases) and gives its endpoint."""
    transport, rule, _, _ = case
    if callable(daemon_endpoint):
        daemon_endpoint = daemon_endpoint()
    doorbell = ["--doorbell", "zmq"] if transport == "shm-zmqbell" else []
    longer = ["--max-new-tokens", BELL_TOKENS, "--quiet"] if rule.startswith("bell-") else []
    tag = secrets.token_hex(4)
    front = f"ipc://{workdir}/h-{tag}.sock"
    info_path = workdir / f"info-{tag}.json"
    out_path, err_path = workdir / f"out-{tag}.txt", workdir / f"err-{tag}.txt"
    proxy = subprocess.Popen([sys.executable, str(PROXY), "--front", front, "--back", daemon_endpoint,
                              "--rule", rule, "--info", str(info_path)], env=_env())
    try:
        deadline = time.monotonic() + 30
        while not info_path.exists():
            assert proxy.poll() is None and time.monotonic() < deadline, "the hostile host did not start"
            time.sleep(0.02)
        start = time.monotonic()
        rc = zygote.run(["client", "--endpoint", front, "--transport", transport.split("-")[0], *doorbell,
                         *CLIENT_ARGS, *longer], cwd=workdir, stdout=out_path, stderr=err_path, timeout=HANG_GUARD)
        elapsed, ended_at = time.monotonic() - start, time.time()
        info = json.loads(info_path.read_text())
        left = [name for name in info["rings"] if os.path.exists(f"/dev/shm{name}")]
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
    for name in left:  # remove them so one failure does not poison the run; the test then fails
        with contextlib.suppress(FileNotFoundError):  # the daemon may unlink a dead client's rings first
            os.unlink(f"/dev/shm{name}")
    # decoded as subprocess.run(text=True, errors="backslashreplace") decodes (universal newlines included)
    stdout, stderr = (path.read_text(errors="backslashreplace") for path in (out_path, err_path))
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "elapsed": elapsed,
            "fired": info["fired"], "wakes": info.get("wakes", 0), "left": left, "after_fire": ended_at - info.get("fired_at", ended_at)}


@pytest.fixture(scope="module")
def outcomes(request, module_daemons, tmp_path_factory):
    """Runs the selected cases (all, or those -k picked), PARALLEL at a time, against one daemon."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_hostile_host"]
    def start_daemon():   # a silent client is dropped after 30 s
        return module_daemons.start("tiny", "--session-timeout", "30")

    zygote = Zygote(_env())  # imports torch while the daemon starts
    try:
        daemon = start_daemon()
        workdir = tmp_path_factory.mktemp("hostile")
        start = time.monotonic()
        # A host that truncates a ring the daemon has mapped may also kill its own daemon with SIGBUS (the
        # host owns that process: its problem, not the enclave's); those cases get a daemon each (started
        # by the case, so that they start side by side), and the shared one must survive everything else.
        endpoints = {case_id(c): (lambda: start_daemon().endpoint) if c[1].startswith("truncate-")
                     else daemon.endpoint for c in selected}
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            futures = {case_id(c): pool.submit(run_case, c, endpoints[case_id(c)], workdir, zygote) for c in selected}
            results = {}
            for name, future in futures.items():  # one case's harness failure fails that case only
                try:
                    results[name] = future.result()
                except Exception as exc:
                    results[name] = {"harness_error": f"{type(exc).__name__}: {exc}"}
    finally:
        zygote.close()
    print(f"\n{len(selected)} hostile-host cases in {time.monotonic() - start:.0f} s ({PARALLEL} at a time)")
    assert daemon.proc.poll() is None, "the daemon died during the hostile cases"
    return results


def _control_free(text: str) -> bool:
    return all(ch.isprintable() or ch in "\n" for ch in text)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hostile_host(outcomes, case):
    transport, rule, expected_rc, mentions = case
    out = outcomes[case_id(case)]
    assert "harness_error" not in out, out.get("harness_error")
    where = f"{case_id(case)}: rc {out['rc']} in {out['elapsed']:.1f} s ({out['after_fire']:.1f} s after the corruption)\nstdout: {out['stdout'][-1500:]!r}\nstderr: {out['stderr'][-3000:]!r}"
    assert out["fired"], f"the rule never fired (the call sequence changed?)\n{where}"
    if rule.startswith("asleep-1"):
        assert out["wakes"] > 0, f"the client never sent a Wake\n{where}"
    assert out["rc"] == expected_rc, where
    assert "Traceback" not in out["stderr"] + out["stdout"], where
    assert _control_free(out["stdout"]) and _control_free(out["stderr"]), where
    lines = out["stderr"].splitlines()
    if expected_rc == 2:
        assert len(lines) == 1 and lines[0].startswith("shmrt client: error:"), where
        assert any(m in lines[0] for m in (mentions if isinstance(mentions, tuple) else (mentions,))), where
        assert len(lines[0]) <= 2100, where
    else:
        assert lines == [], where
    assert not out["left"], f"segments left in /dev/shm: {out['left']}\n{where}"
    assert out["after_fire"] < AFTER_FIRE, where  # start-up time varies with load; this does not
    if mentions == TIMED_OUT:
        assert out["after_fire"] >= TIMEOUT - 0.5, where
