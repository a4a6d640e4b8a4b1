"""Gramine: the manifest template renders like gramine-manifest would and carries what shmrt needs;
the client's forced enclave mode refuses ipc:// and matches a native run over tcp."""
import importlib.util
import subprocess
import tomllib

import numpy as np
import pytest

from conftest import repo_root, shmrt_argv
from shmrt.wire.ring import Ring

spec = importlib.util.spec_from_file_location("check_manifest", repo_root() / "gramine" / "check_manifest.py")
check_manifest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_manifest)
TEMPLATE = repo_root() / "gramine" / "shmrt-client.manifest.template"


def rendered() -> dict:
    return tomllib.loads(check_manifest.render(TEMPLATE))


def test_template_renders_under_strict_undefined_and_validates():
    assert check_manifest.validate(rendered()) == []


def test_missing_define_is_an_error_like_gramine_manifest():
    import jinja2
    with pytest.raises(jinja2.UndefinedError):
        check_manifest.render(TEMPLATE, venv=jinja2.StrictUndefined(name="venv"))


def test_every_ring_name_the_runtime_creates_is_allowed():
    allowed = rendered()["sgx"]["allowed_files"]
    with Ring.create(1 << 16, "req") as req, Ring.create(1 << 16, "rsp") as rsp:
        for ring in (req, rsp):
            uri = f"dev:/dev/shm{ring.name}"
            assert any(uri.startswith(a) for a in allowed), uri


def test_outputs_allowed_and_helper_trusted():
    m = rendered()
    assert any(a.startswith("file:") and a.endswith("/outputs/") for a in m["sgx"]["allowed_files"])
    assert "file:/opt/shmrt/shmrt/wire/" in m["sgx"]["trusted_files"]  # includes shmrt/wire/_native*.so
    assert isinstance(m["loader"]["entrypoint"], dict)  # not the removed string form


def test_validator_catches_deprecated_keys_and_missing_shm_mount():
    m = rendered()
    m["loader"]["entrypoint"] = "file:/x"
    m["fs"]["mounts"] = [x for x in m["fs"]["mounts"] if x.get("type") != "untrusted_shm"]
    problems = check_manifest.validate(m)
    assert any("loader.entrypoint" in p for p in problems) and any("untrusted_shm" in p for p in problems)


def shmrt(*args):
    return subprocess.run(shmrt_argv(*args), capture_output=True, text=True, timeout=120)


def test_forced_enclave_mode_refuses_ipc(tmp_path):
    r = shmrt("run", "--enclave", "--endpoint", f"ipc://{tmp_path}/x.sock", "--log", "")
    assert r.returncode == 2 and "cannot reach a host Unix-domain socket" in r.stderr and "Traceback" not in r.stderr


def test_forced_enclave_run_over_tcp_matches_native_run(tmp_path):
    ids = "5,17,300,2,99,410,7,256,31,64,128,1"
    native, enclave = tmp_path / "native.npy", tmp_path / "enclave.npy"
    r1 = shmrt("run", "--token-ids", ids, "--max-new-tokens", "0", "--logits-out", str(native), "--log", "", "--quiet")
    r2 = shmrt("run", "--enclave", "--token-ids", ids, "--max-new-tokens", "0", "--logits-out", str(enclave),
               "--log", str(tmp_path / "enclave.log"), "--quiet")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    np.testing.assert_array_equal(np.load(native), np.load(enclave))
    assert (tmp_path / "enclave.log").read_text().splitlines()[0].endswith("SHM+TCP")
