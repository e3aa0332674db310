"""PyTorch's CPU `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`, computed
without PyTorch: the paper's code draws its training samples, retrieval keys and evaluation
subsets with it, so the same draw gives the same rows. Tested against a golden file made with
PyTorch by `tools/make_randperm_golden.py` (`tests/tasks/test_instances.py`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from elm_jax.errors import UserInputError

# PyTorch's CPU randperm shuffles with 32-bit draws while n < numeric_limits<uint32_t>::max() / 20
# and with 64-bit draws from this n on; `torch_randperm` reproduces the first branch only.
TORCH_RANDPERM_BRANCH_N = (2**32 - 1) // 20


class RandpermError(UserInputError):
  """A draw this module does not reproduce."""


def torch_randperm(n: int, seed: int = 42, k: Optional[int] = None) -> np.ndarray:
  """The first `k` (None: all n) entries of `torch.randperm(n, generator=torch.Generator()
  .manual_seed(seed))` on the CPU, as int64 [min(k, n)], computed without PyTorch.

  PyTorch seeds a standard MT19937 with `seed` (init_genrand), as numpy's legacy RandomState does
  for an integer seed, and for n < TORCH_RANDPERM_BRANCH_N runs a Fisher-Yates pass: for i in
  0..n-2, swap entries i and i + (next 32-bit output % (n - i)). Entry i is final after step i,
  so the first k entries take k draws and O(k) memory."""
  if not 0 <= n < TORCH_RANDPERM_BRANCH_N:
    raise RandpermError(f"torch_randperm: n must be in [0, {TORCH_RANDPERM_BRANCH_N}) (PyTorch draws "
                        f"64-bit numbers from n = {TORCH_RANDPERM_BRANCH_N} on, which is not reproduced), "
                        f"got {n}")
  if not 0 <= seed < 2**32:
    raise RandpermError(f"torch_randperm: seed must be in [0, 2**32), got {seed}")
  k = n if k is None else max(0, min(k, n))
  # randint over [0, 2**32) returns the generator's raw 32-bit outputs, one per draw.
  draws = np.random.RandomState(seed).randint(0, 2**32, size=min(k, max(n - 1, 0)), dtype=np.uint64)
  out = np.empty(k, np.int64)
  moved: dict[int, int] = {}  # position -> value, for the positions a swap has touched
  for i in range(k):
    value = moved.pop(i, i)
    if i < n - 1:
      z = i + int(draws[i]) % (n - i)
      if z != i:
        value, moved[z] = moved.get(z, z), value
    out[i] = value
  return out
