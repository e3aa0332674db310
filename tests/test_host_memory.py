"""The allocator settings the CLI applies (elm_jax.commands.host_memory)."""

import platform
import sys

import numpy as np
import pytest

from elm_jax.commands import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_glibc_accepts_every_setting():
  # mallopt returns 0 for a setting it refuses, so True means every setting took effect.
  assert host_memory.keep_freed_memory()
  # Allocating and freeing a large buffer still works (the settings change where it comes from).
  for _ in range(3):
    block = np.ones(8 << 20, np.uint8)
    assert int(block.sum()) == 8 << 20
    del block

