"""keep_freed_memory: a thread that allocates and frees the same blocks every step stops
faulting its pages back in (what cost the streamed classifier worker 10 % of its CPU)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from raybias.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# A "training step" in a thread of its own (Ray Train runs the loop in one, with its own
# malloc arena): three 2.5 MB blocks allocated, written, freed. The thresholds first pinned
# to what glibc sets by itself after freeing one 3 MB mmapped block: 3 MB / 6 MB.
STEPS = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from raybias.allocator import keep_freed_memory, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.mallopt(M_MMAP_THRESHOLD, 3 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 6 << 20)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def steps(out):
        start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(50):
            blocks = [libc.malloc(5 << 19) for _ in range(3)]
            for b in blocks:
                libc.memset(b, 1, 5 << 19)
            for b in blocks:
                libc.free(b)
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
    out = []
    t = threading.Thread(target=steps, args=(out,))
    t.start()
    t.join()
    print(out[0])
""")


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_back_in_every_step():
    page = os.sysconf("SC_PAGE_SIZE")
    per_step = 3 * (5 << 19) // page  # pages the three blocks touch
    trimmed = _page_faults("default")
    kept = _page_faults("keep")
    # glibc's own thresholds: the 7.5 MB freed on top of the heap is returned every step
    assert trimmed > 30 * per_step
    # fixed thresholds: only the first step faults its pages in
    assert kept < 3 * per_step


def test_the_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
