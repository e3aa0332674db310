"""The evaluation sweep on this CPU: resumed after a kill against uninterrupted (BENCHMARKS.md).

Usage (the project's environment):
  JAX_PLATFORMS=cpu .venv/bin/python bench/bench_sweep.py [--max_examples=16] [--unit_experts=N] [--write]

What is measured: `elm-jax eval --task=builtin_held_out` (the built-in suite's 12 held-out
rank-classification prompts, `--max_examples` each) on a library of 4 adapter experts of the
one-layer mini T5 (`models/t5_1_1_mini.gin` with 1+1 layers, trained 2 steps by `elm-jax train`
and added by `elm-jax library add`, as the tests build theirs). Every command is a process of
its own, timed from its start to its exit, as a user waits for it (Python, JAX and TensorFlow
start-up, reading the library, scoring, writing units, log, TensorBoard scalars and reports),
and until its sweep logs its start line in log.jsonl (start-up and reading, before any unit):
(a) uninterrupted, into an empty output directory: best of 3 and spread (max - min);
(b) killed with SIGKILL once its log.jsonl shows half the units finished, then the same command
    rerun to completion in the same directory: each process's seconds and their sum, the units
    each computed, the units the rerun skipped, and any unit computed twice.
The reports of (b) (results.json, results.csv, results.md, predictions/) must be byte-identical
to (a)'s, else the script exits 1. Runs go (a), (b), (a), (a), after one untimed run that fills a
compilation cache of the benchmark's own (a temporary directory, through
ELM_JAX_COMPILATION_CACHE): every timed run reads the same compiled programs and none compiles.
Not measured: the library's build, and compilation.

The markdown goes to stdout, progress to stderr; `--write` puts the section into BENCHMARKS.md,
one section per CPU model (a rerun on the same CPU replaces its section;
`head_to_head.write_section`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from head_to_head import BUSY_LOAD, command_line, machine, write_section  # noqa: E402  (bench/ is on the path)
from tests.hostile.harness import train_args  # noqa: E402

HEADING = "## Evaluation sweep: resumed after a kill against uninterrupted"
MIXTURE = "builtin_held_out"
EXPERT_TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of",
                "builtin_nli_gpt3_style"]
REPORTS = ("results.json", "results.csv", "results.md")
TIMEOUT = 600  # seconds any one command may take
REPEATS = 3


class BenchError(Exception):
  """A run that failed, a kill that did not land, or reports that differ."""


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def avx512() -> bool:
  """Whether /proc/cpuinfo lists the AVX-512 foundation instructions (avx512f)."""
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


def cli(*argv: str) -> list[str]:
  return [sys.executable, "-m", "elm_jax.commands.cli", *argv]


def eval_argv(lib: str, out: str, args) -> list[str]:
  return cli("eval", f"--library={lib}", f"--task={MIXTURE}", f"--output_dir={out}",
             f"--max_examples={args.max_examples}", "--no_progress",
             *([f"--unit_experts={args.unit_experts}"] if args.unit_experts else []))


def log_records(out: str) -> list[dict]:
  """The complete lines of `out`/log.jsonl (a kill may cut the last one short)."""
  path = os.path.join(out, "log.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().endswith("}")]


def run(argv: list[str], env: dict, out: Optional[str] = None, kill_after_units: Optional[int] = None) -> dict:
  """Runs one command (its output into files beside `out`); with `kill_after_units`, kills it with
  SIGKILL as soon as `out`/log.jsonl shows that many more units finished than before it started.
  Returns its wall seconds, the seconds until its sweep logged its start (start-up and loading),
  whether it was killed, the units it computed (their indices), the units it skipped, and its
  stderr."""
  before = len(log_records(out)) if out else 0
  streams = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  start = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=streams[0], stderr=streams[1], text=True)
  killed, started = False, None
  while out and proc.poll() is None and time.perf_counter() - start < TIMEOUT:
    records = log_records(out)[before:]
    if started is None and any(r["event"] == "start" for r in records):
      started = time.perf_counter() - start
    if kill_after_units is not None and sum(r["event"] == "unit" for r in records) >= kill_after_units:
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.05)
  try:
    proc.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise BenchError(f"{' '.join(argv[3:5])}: still running after {TIMEOUT} s; stopped") from None
  seconds = time.perf_counter() - start
  streams[1].seek(0)
  stderr = streams[1].read()
  for stream in streams:
    stream.close()
  if not killed and proc.returncode != 0:
    raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}:\n{stderr[-3000:]}")
  records = log_records(out)[before:] if out else []
  starts = [r for r in records if r["event"] == "start"]
  return {"seconds": seconds, "started": started, "killed": killed,
          "units": [r["unit"] for r in records if r["event"] == "unit"],
          "skipped": starts[0]["skipped"] if starts else None, "total": starts[0]["units"] if starts else None,
          "stderr": stderr}


def reports(out: str) -> dict[str, bytes]:
  names = list(REPORTS) + [os.path.join("predictions", n) for n in sorted(os.listdir(os.path.join(out, "predictions")))]
  return {n: pathlib.Path(out, n).read_bytes() for n in names}


def layout_line(stderr: str) -> str:
  """The line in which `eval` says which devices and layout it chose."""
  return next((line for line in stderr.splitlines() if line.startswith("eval: ") and " device" in line), "not said")


def measure(args, work: str) -> dict:
  env = dict(os.environ, ELM_JAX_COMPILATION_CACHE=os.path.join(work, "compilation_cache"))
  env.setdefault("JAX_PLATFORMS", "cpu")
  lib = os.path.join(work, "lib")
  log(f"building the library in {work} (train 4 experts, library add)")
  run(cli(*train_args(os.path.join(work, "run"), EXPERT_TASKS)), env)
  run(cli("library", "add", f"--library={lib}", "--keys=none", os.path.join(work, "run")), env)
  log("warm-up run (fills the compilation cache; not timed)")
  warm = run(eval_argv(lib, os.path.join(work, "warm"), args), env, os.path.join(work, "warm"))
  total = warm["total"]
  if not total:
    raise BenchError(f"the warm-up run logged no start event in {os.path.join(work, 'warm', 'log.jsonl')}")
  uninterrupted, resumed, reference = [], None, None
  for i in range(REPEATS):
    out = os.path.join(work, f"uninterrupted_{i}")
    uninterrupted.append(run(eval_argv(lib, out, args), env, out))
    log(f"uninterrupted {i + 1}/{REPEATS}: {uninterrupted[-1]['seconds']:.2f} s, "
        f"{len(uninterrupted[-1]['units'])} units")
    if reference is None:
      reference = reports(out)
    elif reports(out) != reference:
      raise BenchError(f"{out}: an uninterrupted run's reports differ from the first one's")
    if i == 0:
      out = os.path.join(work, "killed")
      killed = run(eval_argv(lib, out, args), env, out, kill_after_units=total // 2)
      if not killed["killed"]:
        raise BenchError(f"the run to be killed finished before {total // 2} of its {total} units were logged")
      rerun = run(eval_argv(lib, out, args), env, out)
      log(f"killed after {len(killed['units'])} units at {killed['seconds']:.2f} s; rerun {rerun['seconds']:.2f} s, "
          f"{rerun['skipped']} units skipped, {len(rerun['units'])} computed")
      resumed = {"killed": killed, "rerun": rerun, "identical": reports(out) == reference,
                 "twice": sorted(set(killed["units"]) & set(rerun["units"]))}
  times = [r["seconds"] for r in uninterrupted]
  fastest = uninterrupted[times.index(min(times))]
  return {"total": total, "layout": layout_line(warm["stderr"]), "times": times,
          "units": len(uninterrupted[0]["units"]), "started": fastest["started"], **resumed}


def seconds(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:.2f}"


def render(args, result: dict, started, loads) -> str:
  killed, rerun = result["killed"], result["rerun"]
  best, spread = min(result["times"]), max(result["times"]) - min(result["times"])
  both = killed["seconds"] + rerun["seconds"]
  computed = len(killed["units"]) + len(rerun["units"])
  identical = "yes" if result["identical"] else "**NO**"
  unit_experts = args.unit_experts or len(EXPERT_TASKS)
  out = [f"{HEADING} (bench/bench_sweep.py): {machine()}, {'with' if avx512() else 'without'} AVX-512", "",
         f"Command: `{command_line()}`", "",
         f"Date: {started:%Y-%m-%d %H:%M %Z}. Machine: {machine()}, {'with' if avx512() else 'without'} AVX-512; "
         f"load average (1 / 5 / 15 min) {' / '.join(f'{x:.2f}' for x in loads[0])} before the run, "
         f"{' / '.join(f'{x:.2f}' for x in loads[1])} after it. jax {jax.__version__}; "
         f"eval's layout: `{result['layout']}`.", ""]
  if loads[0][0] > BUSY_LOAD * (os.cpu_count() or 1):
    out += [f"**The machine was busy before the run (load {loads[0][0]:.2f} on {os.cpu_count()} cores): "
            "these figures are not final.**", ""]
  out += [f"Workload: `elm-jax eval --task={MIXTURE} --max_examples={args.max_examples}"
          f"{f' --unit_experts={args.unit_experts}' if args.unit_experts else ''}` (12 rank-classification prompts) "
          f"over a library of {len(EXPERT_TASKS)} adapter experts of the one-layer mini T5 (trained 2 steps): "
          f"{result['total']} units of {unit_experts} expert(s) x 1 task. Each run is a process of its own, timed "
          "from start to exit (start-up, loading, scoring, unit files, log, TensorBoard scalars, reports); one "
          "untimed run filled the compilation cache first, so no timed run compiles. The killed run got SIGKILL "
          f"once its log.jsonl showed {result['total'] // 2} finished units; the rerun is the same command.", "",
          "| run | seconds | of which to its start line | units computed | units skipped | reports |",
          "|---|---|---|---|---|---|",
          f"| (a) uninterrupted, best of {len(result['times'])} (spread) | {best:.2f} (+{spread:.2f}) | "
          f"{seconds(result['started'])} | {result['units']} | 0 | the reference |",
          f"| (b) killed with SIGKILL | {killed['seconds']:.2f} | {seconds(killed['started'])} | "
          f"{len(killed['units'])} | 0 | none written |",
          f"| (b) rerun to completion | {rerun['seconds']:.2f} | {seconds(rerun['started'])} | {len(rerun['units'])} | "
          f"{rerun['skipped']} | byte-identical to (a): {identical} |",
          f"| (b) in all | {both:.2f} ({both / best:.2f}x (a)) | | {computed} ({len(result['twice'])} twice) | "
          f"{rerun['skipped']} | |", "",
          f"\"To its start line\": until the sweep logged its start in log.jsonl (Python, JAX and TensorFlow "
          f"start-up, reading the library and the tasks' examples, reading the unit files). The kill cost "
          f"{both - best:.2f} s over (a)'s best: a second start-up and the work on the unit in flight when the kill "
          f"came, which is lost; units computed twice: {result['twice'] or 'none'}."]
  return "\n".join(out) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--max_examples", type=int, default=16, help="examples per prompt (eval --max_examples)")
  parser.add_argument("--unit_experts", type=int, default=None,
                      help="experts per sweep unit (eval --unit_experts; default: eval's, all of them)")
  parser.add_argument("--workdir", default=None, help="keep the library and outputs here (default: a temporary "
                                                      "directory, removed at the end)")
  parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
  args = parser.parse_args()
  loads_before = os.getloadavg()
  started = datetime.datetime.now().astimezone()
  try:
    if args.workdir:
      os.makedirs(args.workdir, exist_ok=False)
      result = measure(args, os.path.abspath(args.workdir))
    else:
      with tempfile.TemporaryDirectory(prefix="elm_bench_sweep_") as work:
        result = measure(args, work)
  except (BenchError, FileExistsError) as e:
    print(f"FAILED: {e}", file=sys.stderr)
    return 1
  report = render(args, result, started, (loads_before, os.getloadavg()))
  print(report)
  if not result["identical"]:
    print("FAILED: the resumed sweep's reports differ from the uninterrupted one's", file=sys.stderr)
    return 1
  if args.write:
    write_section(REPO / "BENCHMARKS.md", report, family=HEADING)
    log("written to BENCHMARKS.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
