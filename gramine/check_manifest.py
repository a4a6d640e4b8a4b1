"""Render the manifest template without Gramine and validate it (`make -C gramine check`).

Mirrors gramine-manifest: a Jinja2 environment with StrictUndefined and `gramine`, `python`, `env`
globals (stand-ins here), then parses the TOML and checks what shmrt relies on.
"""
from __future__ import annotations

import pathlib
import re
import sys
import tomllib

import jinja2

HERE = pathlib.Path(__file__).resolve().parent
DEPRECATED = {"loader.entrypoint": "string form removed in 1.9", "sgx.thread_num": "renamed sgx.max_threads",
              "loader.argv0_override": "removed", "sgx.require_avx": "removed", "fs.mount": "use fs.mounts",
              "sgx.static_address": "removed", "sgx.nonpie_binary": "removed"}


class _Gramine:
    libos = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"

    @staticmethod
    def runtimedir(libc: str = "glibc") -> str:
        return f"/usr/lib/x86_64-linux-gnu/gramine/runtime/{libc}"


class _Python:
    stdlib = "/usr/lib/python3.11"
    distlib = "/usr/lib/python3/dist-packages"


def render(template: pathlib.Path, **defines) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals.update(gramine=_Gramine(), python=_Python(), env={})
    values = dict(entrypoint="/usr/bin/python3.11", arch_libdir="/lib/x86_64-linux-gnu", log_level="error",
                  venv="/opt/shmrt/.venv", repo="/opt/shmrt", outputs="/opt/shmrt/outputs", models="/opt/shmrt/models", threads="8",
                  enclave_size="16G", max_threads=64)
    values.update(defines)
    return env.from_string(template.read_text()).render(**values)


def _flatten(obj, prefix=""):
    for key, value in obj.items():
        name = f"{prefix}{key}"
        yield name, value
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")


def validate(manifest: dict) -> list[str]:
    problems = []
    keys = dict(_flatten(manifest))
    for key, why in DEPRECATED.items():
        if key in keys and not (key == "loader.entrypoint" and isinstance(keys[key], dict)):
            problems.append(f"{key}: {why}")
    mounts = manifest.get("fs", {}).get("mounts", [])
    if {"type": "untrusted_shm", "path": "/dev/shm", "uri": "dev:/dev/shm"} not in mounts:
        problems.append("no untrusted_shm mount of /dev/shm")
    if not any(m.get("type") == "tmpfs" and m.get("path") == "/tmp" for m in mounts):
        problems.append("no tmpfs /tmp")
    allowed = manifest.get("sgx", {}).get("allowed_files", [])
    if not any(a.rstrip("/") == "dev:/dev/shm" for a in allowed):
        problems.append("ring segments in /dev/shm are not in sgx.allowed_files")
    trusted = manifest.get("sgx", {}).get("trusted_files", [])
    if not any(t.endswith("/shmrt/enclave/") for t in trusted) or not any(t.endswith("/shmrt/wire/") for t in trusted):
        problems.append("shmrt's enclave side (shmrt/enclave/, shmrt/wire/ with the C helper) is not trusted")
    if any("/shmrt/host" in t or t.endswith("/shmrt/") for t in trusted):
        problems.append("the host side (shmrt/host/) must not be a trusted file of the enclave")
    if manifest.get("sys", {}).get("enable_sigterm_injection") is not True:
        problems.append("sys.enable_sigterm_injection is not true (Ctrl-C would not reach the client)")
    if manifest.get("loader", {}).get("env", {}).get("SHMRT_ENCLAVE") != "1":
        problems.append("loader.env.SHMRT_ENCLAVE must be \"1\" (tcp-only doorbell inside the enclave)")
    if not re.fullmatch(r"\d+[GM]", str(manifest.get("sgx", {}).get("enclave_size", ""))):
        problems.append("sgx.enclave_size missing")
    return problems


def main(argv) -> int:
    template = pathlib.Path(argv[1]) if len(argv) > 1 else HERE / "shmrt-client.manifest.template"
    manifest = tomllib.loads(render(template))
    problems = validate(manifest)
    for p in problems:
        print(f"manifest check: {p}", file=sys.stderr)
    if not problems:
        print(f"manifest check: {template.name} renders and validates "
              f"({len(manifest['fs']['mounts'])} mounts, {len(manifest['sgx']['trusted_files'])} trusted entries)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
