"""The quickstart notebook's run time, headless, as a user on this machine waits for it.

Usage (the project's environment, with the `test` extra for nbclient):
  JAX_PLATFORMS=cpu .venv/bin/python bench/bench_quickstart.py [--budget=quickstart] [--cache=fresh|warm] [--repeat=1]

What is measured: `notebooks/quickstart.ipynb` executed by nbclient in a fresh python3 kernel,
with its `BUDGET` parameter set (papermill-style, as tests/test_notebooks.py does) and `OUT` in
an empty temporary directory, from the kernel's start to the last cell's end: kernel start-up,
imports of JAX, TensorFlow and SeqIO, the backbone, training 8 experts and the multitask
baseline, the library, scoring, RoE, merging, two evaluations of the 12 held-out prompts and the
plot. Each cell's seconds are printed too. `--cache=fresh` (default) gives the kernel a compilation cache
of its own in an empty temporary directory (ELM_JAX_COMPILATION_CACHE), as a first run on a new
runtime compiles everything; `--cache=warm` uses the user's cache as it is (run it once first
for a second run's figure). Prints a markdown table on stdout; BENCHMARKS.md is written by hand
from it, with the machine and how busy it was.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import nbclient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def run_once(budget: str, cache: str) -> tuple[float, list[tuple[str, float]]]:
  """(wall seconds, [(first line of each code cell, its seconds)]) of one headless run."""
  sys.path.insert(0, REPO)
  from tests.test_notebooks import with_parameters  # the injection the test uses
  with tempfile.TemporaryDirectory() as tmp:
    book = with_parameters(NOTEBOOK, {"BUDGET": budget, "OUT": os.path.join(tmp, "out")})
    saved = os.environ.get("ELM_JAX_COMPILATION_CACHE")
    if cache == "fresh":
      os.environ["ELM_JAX_COMPILATION_CACHE"] = os.path.join(tmp, "jax_cache")
    try:
      client = nbclient.NotebookClient(book, timeout=1800, kernel_name="python3", record_timing=True,
                                       resources={"metadata": {"path": tmp}})
      start = time.perf_counter()
      client.execute()
      wall = time.perf_counter() - start
    finally:
      if cache == "fresh":
        if saved is None:
          os.environ.pop("ELM_JAX_COMPILATION_CACHE", None)
        else:
          os.environ["ELM_JAX_COMPILATION_CACHE"] = saved
  cells = []
  for cell in book.cells:
    timing = cell.metadata.get("execution", {})
    if cell.cell_type == "code" and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
      began = datetime.datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
      ended = datetime.datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
      cells.append((cell.source.splitlines()[0][:70], (ended - began).total_seconds()))
  return wall, cells


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", default="quickstart", choices=("quickstart", "test"))
  parser.add_argument("--cache", default="fresh", choices=("fresh", "warm"))
  parser.add_argument("--repeat", type=int, default=1)
  args = parser.parse_args()
  walls = []
  for i in range(args.repeat):
    wall, cells = run_once(args.budget, args.cache)
    walls.append(wall)
    print(f"run {i + 1}: {wall:.1f} s", file=sys.stderr)
  print(f"quickstart notebook, BUDGET={args.budget!r}, {args.cache} compilation cache, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {args.repeat} run(s)\n")
  print("| cell (first line) | seconds |\n|---|---|")
  for source, seconds in cells:
    print(f"| `{source}` | {seconds:.1f} |")
  print(f"| **whole notebook, kernel start to last cell** (best of {len(walls)}, spread "
        f"{max(walls) - min(walls):.1f}) | **{min(walls):.1f}** |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
