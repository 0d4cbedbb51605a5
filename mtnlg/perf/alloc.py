"""Keep freed CPU memory in the process for the next training step.

A training step allocates and frees the same few hundred megabytes of
activations, gradients and logits every time.  glibc's malloc serves large
blocks with ``mmap`` and gives them back with ``munmap`` (and trims the heap
top), so each step touches fresh pages: the kernel zero-fills them on first
write, a minor page fault per 4 KiB (~600k faults and ~1.3 s of system time
in a benchmark process of the 14M model on the 2-core CPU).  Raising the mmap
threshold to its maximum and switching off trimming makes those blocks come
from the heap and stay there: 3x fewer faults, half the system time, 3.5-7%
more tokens/s (README "Performance").  For one process the peak resident
memory does not grow (the memory is reused, not added); memory freed after the
peak is not returned to the OS until the process ends.

Many ranks per host under ZeRO-3 are the opposite case: gathered weights and
gradient buffers of many sizes come and go, and a heap that keeps them held
0.25-0.6 GB more per rank in the 760M scale drill (docs/scale.md).  There the
run sets glibc's own environment variables (``MALLOC_MMAP_THRESHOLD_=1048576``),
and this module then leaves malloc alone: an explicit ``MALLOC_*`` setting wins.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (once per process).
    False where the C library is not glibc (macOS, musl) or the environment sets
    glibc's malloc tunables itself (``ENV_SETTINGS``): nothing changes."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ENV_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
          and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(M_TOP_PAD, 64 << 20) == 1)
    _done = ok
    return ok


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2 = None


def malloc_stats() -> dict[str, int] | None:
    """glibc's own account of this process's malloc memory (``mallinfo2``, summed over its
    arenas), in bytes: ``heap`` (obtained from the system for the heaps, including a top pad
    not yet touched), ``in_use`` (allocated blocks in the heaps), ``free`` (free blocks in
    the heaps), ``mmapped`` (blocks above the mmap threshold, each its own mapping, returned
    to the system when freed).  None where the C library is not glibc >= 2.33."""
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
        except (OSError, AttributeError):
            _mallinfo2 = False
            return None
        fn.restype, fn.argtypes = _Mallinfo2, []
        _mallinfo2 = fn
    if _mallinfo2 is False:
        return None
    m = _mallinfo2()
    return {"heap": m.arena, "in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd}


def heap_resident_bytes() -> int:
    """Resident bytes of the main heap (the ``[heap]`` mapping that ``brk`` grows; Linux), 0 if absent."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                    inside = line.rstrip().endswith("[heap]")
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MallocSampler:
    """Samples this process's VmRSS and ``malloc_stats`` every ``every_s`` in a thread until
    ``stop()``, which returns, at the largest sampled RSS: ``rss``, ``in_use``, ``mmapped`` and
    ``heap`` (the main heap's resident bytes, read at each new peak: ~1 ms), and
    ``most_in_use`` (the most heap bytes in use at any sample) and ``samples``."""

    def __init__(self, every_s: float = 0.002):
        import threading
        self.peak = {"rss": 0, "in_use": 0, "mmapped": 0, "heap": 0}
        self.most_in_use, self.samples = 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._done.is_set():
            m = malloc_stats()
            if m is None:
                return
            with open("/proc/self/status") as f:
                rss = int(next(x for x in f if x.startswith("VmRSS")).split()[1]) * 1024
            if rss > self.peak["rss"]:
                self.peak = {"rss": rss, "in_use": m["in_use"], "mmapped": m["mmapped"],
                             "heap": heap_resident_bytes()}
            self.most_in_use = max(self.most_in_use, m["in_use"])
            self.samples += 1
            self._done.wait(every_s)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self._thread.join()
        return {**self.peak, "most_in_use": self.most_in_use, "samples": self.samples}
