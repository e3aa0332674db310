"""Host allocator settings for long training and evaluation processes (glibc Linux only).

XLA's CPU runtime and TensorFlow allocate and free large buffers every step. With glibc's
defaults each large buffer is a fresh `mmap` and freed memory above 128 KiB at the top of the
heap goes back to the kernel, so the next step faults every page in again: 3 million page faults
and 10 s of kernel time in the demo's 22 s pretraining stage on 2 cores. Keeping freed memory in
the process (it is reused by the next step) removes most of them (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20    # buffers below 32 MiB come from the heap (a thread's heap holds 64)
TRIM_THRESHOLD = 1 << 30     # up to 1 GiB of freed heap stays in the process for reuse
TOP_PAD = 64 << 20           # the heap grows 64 MiB at a time


def keep_freed_memory() -> bool:
  """Applies the settings above; True when the C library took them (False elsewhere than glibc)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
