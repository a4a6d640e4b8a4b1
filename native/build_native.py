"""cffi out-of-line API build of shmrt's C helper (`shmrt.wire._native`).

setup.py names this module's `ffibuilder` in `cffi_modules`; `python native/build_native.py`
builds it in place for development.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "shmrt_native.h"


def _cdef_from_header() -> str:
    text = HEADER.read_text()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    # cffi's cdef takes '#define NAME <int>' but no comments spanning lines are an issue: strip them.
    lines = []
    for line in body.splitlines():
        line = line.split("/*", 1)[0].rstrip()
        if line:
            lines.append(line)
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "shmrt.wire._native",
    '#include "shmrt_native.h"',
    sources=[str(HERE.relative_to(pathlib.Path.cwd()) / name) if HERE.is_relative_to(pathlib.Path.cwd())
             else str(HERE / name) for name in ("shmrt_native.c", "shmrt_ring.c", "shmrt_lane.c", "shmrt_call.c", "shmrt_rows.c")],
    include_dirs=[str(HERE)],
    libraries=["m"],
    # -O3: the enclave's rows vectorize (a 2048-wide residual and norm 1.1 vs 1.7 us on 2 cores); no fast-math
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
)


def drop_other_builds(keep: pathlib.Path | None = None) -> None:
    """Remove the helper's module files but `keep`: pip's editable build names it _native.abi3.so, a build by this
    script _native.<interpreter tag>.so, and Python imports the latter first, so a stale one of either would shadow
    a fresh other (a bench script's build once hid a session's C changes from its own tests)."""
    for module in (HERE.parent / "shmrt" / "wire").glob("_native.*.so"):
        if module != keep:
            module.unlink()


if __name__ == "__main__":
    built = pathlib.Path(ffibuilder.compile(tmpdir=str(HERE.parent), verbose=False)).resolve()
    drop_other_builds(keep=built)
