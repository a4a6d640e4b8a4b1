"""tools/heap.py: what the entry points do with the heap once set up (in a fresh interpreter: it is per process)."""
import subprocess
import sys


def test_freeze_heap_collects_and_freezes_once_per_process():
    script = ("import gc; from shmrt.tools.heap import freeze_heap; assert gc.get_freeze_count() == 0; "
              "freeze_heap(); n = gc.get_freeze_count(); freeze_heap(); "
              "assert gc.get_freeze_count() == n > 1000, n; print('ok')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
