"""What checking an expert's sha256 on load costs: an XL prompt expert's tensors (the paper's
adapters plus layer-norm scales on T5-XL: 25.6M float32 parameters, 102 MB) in a library, loaded
with `ExpertLibrary.load` with the check (first load in a process, and a repeat load, which is
not hashed again) and without it (`check_integrity=False`).

Usage:
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_integrity.py [--repeats 3]

Each figure is the best and the spread (max - min) of `--repeats` runs; every run loads a fresh
copy of the file written to another path, so the page cache holds it (as it does for a library
on a local disk that was just written or read) but this process has not hashed it yet. The
hashing throughput of hashlib.sha256 alone is reported for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from elm_jax import files
from elm_jax.checkpoints import expert_files
from elm_jax.library.store import ExpertLibrary

# T5-XL (d_model 2048, 24+24 blocks): 96 adapters of (2048 x 64 + 64 + 64 x 2048 + 2048) plus
# 122 layer-norm scales of 2048: 25,368,576 + 249,856 parameters (ELM_NOTES §1.2-1.3).
ADAPTERS, EMB, BOTTLENECK, NORMS = 96, 2048, 64, 122


def xl_expert() -> dict:
  rng = np.random.default_rng(0)
  tree = {}
  for i in range(ADAPTERS):
    tree[f"adapter_{i}"] = {
        "down_kernel": rng.normal(0, 0.01, (EMB, BOTTLENECK)).astype(np.float32),
        "down_bias": np.zeros(BOTTLENECK, np.float32),
        "up_kernel": rng.normal(0, 0.01, (BOTTLENECK, EMB)).astype(np.float32),
        "up_bias": np.zeros(EMB, np.float32)}
  for i in range(NORMS):
    tree[f"norm_{i}"] = {"scale": np.ones(EMB, np.float32)}
  return tree


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="bench-integrity-")
  try:
    source = os.path.join(work, "xl_expert")
    meta = expert_files.ExpertMetadata(name="xl", task="bench", expert_config={"kind": "adapter"},
                                       backbone_fingerprint="bench")
    expert_files.save_expert(source, xl_expert(), meta)
    size = os.path.getsize(os.path.join(source, expert_files.TENSORS_FILE))
    rows = {"hashlib.sha256 of the bytes in memory": [], "load, sha256 checked (first time in the process)": [],
            "load, sha256 checked again (same process: not re-hashed)": [],
            "load, --skip_integrity_check": []}
    data = open(os.path.join(source, expert_files.TENSORS_FILE), "rb").read()
    for r in range(args.repeats):
      library = ExpertLibrary(os.path.join(work, f"lib{r}"), create=True)
      library.add(source, name=f"xl{r}")
      unchecked = ExpertLibrary(library.root, check_integrity=False)
      files._verified.clear()
      rows["hashlib.sha256 of the bytes in memory"].append(_time(lambda: hashlib.sha256(data).hexdigest()))
      # Warm the page cache for this copy without hashing it in this process.
      unchecked.load(f"xl{r}")
      rows["load, --skip_integrity_check"].append(_time(lambda: unchecked.load(f"xl{r}")))
      rows["load, sha256 checked (first time in the process)"].append(_time(lambda: library.load(f"xl{r}")))
      rows["load, sha256 checked again (same process: not re-hashed)"].append(_time(lambda: library.load(f"xl{r}")))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"expert tensors file {size / 1e6:.1f} MB; best and spread of {args.repeats}")
    print("| what | best (s) | spread (s) | MB/s |")
    print("|---|---|---|---|")
    for what, times in rows.items():
      best = min(times)
      print(f"| {what} | {best:.3f} | {max(times) - best:.3f} | {size / 1e6 / best:.0f} |")
  finally:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
