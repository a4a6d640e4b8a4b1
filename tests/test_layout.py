"""The layout shows the trust boundary, and the code keeps to it: the enclave side's import closure holds
nothing of the host side, the manifest trusts exactly that closure, the analyzer stays light, and
shmrt's modules import each other without cycles."""
import ast
import json
import subprocess
import sys
import tomllib

import pytest

from conftest import repo_root
from test_gramine import TEMPLATE, check_manifest

PACKAGE = repo_root() / "shmrt"

# Run the real client (both transports) against a real daemon; report every shmrt module it loaded.
CLIENT_CLOSURE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.startswith("shmrt")))))
import shmrt.model.gguf_checkpoint  # loaded lazily for GGUF models: part of the closure too
from shmrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def client_modules(tmp_path_factory):
    """transport -> the shmrt modules a real client run loaded. One daemon, and each transport's client run
    once for both tests below (the second asked again for shm's: the same run, ~4 s of it)."""
    from shmrt.tools.process import DaemonProcess
    seen: dict[str, set[str]] = {}
    with DaemonProcess(["--model", "tiny"], f"ipc://{tmp_path_factory.mktemp('layout')}/d.sock", timeout=120,
                       quiet=True) as d:
        def modules(transport: str) -> set[str]:
            if transport not in seen:
                r = subprocess.run([sys.executable, "-c", CLIENT_CLOSURE, "client", "--model", "tiny", "--endpoint",
                                    d.endpoint, "--transport", transport, "--prefill", "8", "--max-new-tokens", "2",
                                    "--log", "", "--quiet"], capture_output=True, text=True, timeout=120, cwd=repo_root())
                assert r.returncode == 0, r.stderr
                seen[transport] = set(json.loads(r.stdout.split("MODULES ", 1)[1]))
            return seen[transport]
        yield modules


def test_the_enclave_client_loads_nothing_from_the_host_side(client_modules):
    for transport in ("shm", "msgpack"):
        modules = client_modules(transport)
        assert "shmrt.enclave.client" in modules and "shmrt.wire._native" in modules
        assert not [m for m in modules if m.startswith(("shmrt.host", "shmrt.tools.bench", "shmrt.tools.analyze"))]


def test_the_manifest_trusts_the_enclave_closure_and_nothing_of_the_host(client_modules):
    trusted = [t.removeprefix("file:/opt/shmrt/") for t in
               tomllib.loads(check_manifest.render(TEMPLATE))["sgx"]["trusted_files"] if "/opt/shmrt/shmrt" in t]
    modules = client_modules("shm")
    for module in modules:
        path = PACKAGE.parent / (module.replace(".", "/"))
        rel = str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(PACKAGE.parent))
        if module == "shmrt.wire._native" or module.startswith("shmrt.wire._native."):
            rel = "shmrt/wire/_native.abi3.so"
        assert any(rel == t or (t.endswith("/") and rel.startswith(t)) for t in trusted), f"{module} is not trusted"
    assert not any(t.startswith(("shmrt/host", "shmrt/tools/bench")) or t == "shmrt/" for t in trusted)


def test_the_analyzer_loads_neither_torch_nor_zmq():
    r = subprocess.run([sys.executable, "-c", "import sys, shmrt.tools.analyze; "
                        "print(sorted({'torch', 'zmq'} & set(sys.modules)))"], capture_output=True, text=True,
                       cwd=repo_root())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _module_imports() -> dict[str, set[str]]:
    """shmrt module -> shmrt modules it imports at module level (not inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d.startswith("shmrt") and d != name}
    return graph


def test_no_import_cycles_between_shmrt_modules():
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_layout_names_where_code_runs():
    for sub, words in {"wire": "both sides", "enclave": "inside the enclave", "host": "on the host",
                       "model": "both sides"}.items():
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text())) or ""
        assert words in doc.replace("\n", " "), (sub, doc)
    assert not [p for p in PACKAGE.glob("*.py")
                if p.stem not in ("__init__", "__main__", "cli", "errors", "settings", "units")], "modules outside the layout"
