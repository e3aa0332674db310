"""Builds the golden file that `tasks.randperm.torch_randperm` is tested against.

The paper's code draws its samples with `torch.randperm(n, generator=torch.Generator().manual_seed(
seed))` (ELM_NOTES §1.5 and §4.1). This script records what PyTorch returns for a fixed list of
(n, seed): the whole permutation for small n, its first 300 entries otherwise. The list covers
n = 0, 1 and 2, the sizes of splits the paper draws from (300-row evaluation files, a 1,871-row
validation CSV, 50,000-row slices, a 582,659-row train split), other seeds, and both sides of
randperm's branch on n: PyTorch shuffles with `generator->random() % (n - i)` (a Fisher-Yates
pass over 32-bit draws) while n < 2**32 / 20 and switches to 64-bit draws at n = 214,748,364,
so the last two entries are n = 214,748,363 (the last n of the 32-bit branch) and 214,748,364
(the first of the other branch, which `torch_randperm` refuses; each costs about 2 GB and 15 s).

Writes `tests/golden/torch_randperm/randperm_golden.json`:
  {"torch_version": ..., "branch_n": 214748364,
   "cases": [{"n": N, "seed": S, "first": [int, ...]}, ...]}

The test (tests/tasks/test_instances.py) reads it and needs no torch. Run from the repo root
with any Python that has torch (CPU is enough), e.g. a throwaway venv:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
    /tmp/torchvenv/bin/python tools/make_randperm_golden.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

BRANCH_N = (2**32 - 1) // 20  # PyTorch: n < numeric_limits<uint32_t>::max() / 20 keeps the 32-bit loop
FULL_UP_TO = 2_000            # whole permutations up to this n; the first PREFIX entries above it
PREFIX = 300
CASES = [(0, 42), (1, 42), (2, 42), (3, 42), (10, 42), (32, 42), (100, 42), (300, 42), (1_871, 42),
         (10_000, 42), (43_738, 42), (50_000, 42), (582_659, 42), (1_000, 0), (1_000, 1234),
         (2**31 // 1000, 7), (BRANCH_N - 1, 42), (BRANCH_N, 42)]
OUT = os.path.join("tests", "golden", "torch_randperm", "randperm_golden.json")


def first_entries(n: int, seed: int) -> list[int]:
  generator = torch.Generator()
  generator.manual_seed(seed)
  perm = torch.randperm(n, generator=generator)
  return perm[: n if n <= FULL_UP_TO else PREFIX].tolist()


def main() -> int:
  cases = [{"n": n, "seed": seed, "first": first_entries(n, seed)} for n, seed in CASES]
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w") as f:
    json.dump({"torch_version": torch.__version__, "branch_n": BRANCH_N, "cases": cases}, f)
    f.write("\n")
  print(f"wrote {OUT} ({len(cases)} cases, torch {torch.__version__})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
