"""kill -9 at random moments of an `eval` sweep over a 12-task mixture (24 units: one task x
one expert each), each kill followed by the next run of the same command: the reports at the
end are byte-identical to an uninterrupted sweep's, and no finished unit was computed twice
(the log has each unit once).

Each run is killed at a moment drawn uniformly from its first three units' worth of work after
it logs its start (the time before that is Python, JAX and TensorFlow start-up, which touches
no file; a unit's time is measured on the uninterrupted sweep), so every kill lands while units
are being computed and written. The generator is seeded: set ELM_KILL_SEED to replay a
failure; the seed in use is printed. Every process is waited for with a timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import gin
import pytest

from elm_jax.commands import cli
from tests.hostile.harness import REPO, train_args

TIMEOUT = 300
KILLS = 8
pytestmark = pytest.mark.slow


def _eval(lib, out) -> list[str]:
  return [sys.executable, "-m", "elm_jax.commands.cli", "eval", f"--library={lib}", "--task=builtin_held_out",
          f"--output_dir={out}", "--max_examples=4", "--batch_size=4", "--unit_experts=1", "--no_progress",
          "--mesh=data:1"]


def _starts(out) -> int:
  path = os.path.join(out, "log.jsonl")
  return open(path).read().count('"event": "start"') if os.path.exists(path) else 0


def _run_watched(argv, out, kill_after=None) -> tuple[bool, float, float]:
  """Runs the command; with `kill_after` (seconds after it logs its start) kills it then.
  Returns (killed, seconds to its start line, seconds in all)."""
  before = _starts(out)
  begin = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  started = None
  while proc.poll() is None and time.perf_counter() - begin < TIMEOUT:
    if started is None and _starts(out) > before:
      started = time.perf_counter() - begin
    if started is not None and kill_after is not None and time.perf_counter() - begin >= started + kill_after:
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=TIMEOUT)
      return True, started, time.perf_counter() - begin
    time.sleep(0.02)
  proc.wait(timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr.read()[-3000:]
  return False, started or 0.0, time.perf_counter() - begin


def _reports(out) -> dict[str, bytes]:
  names = ["results.json", "results.csv", "results.md"] + [
      os.path.join("predictions", n) for n in sorted(os.listdir(os.path.join(out, "predictions")))]
  return {n: open(os.path.join(out, n), "rb").read() for n in names}


def test_kill_an_eval_sweep_at_random_moments_then_rerun(tmp_path):
  seed = int(os.environ.get("ELM_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
  print(f"ELM_KILL_SEED={seed}")
  rng = random.Random(seed)
  gin.clear_config()
  assert cli.main(train_args(tmp_path / "run")) == 0
  gin.clear_config()
  lib = tmp_path / "lib"
  assert cli.main(["library", "add", f"--library={lib}", "--keys=none", str(tmp_path / "run")]) == 0
  gin.clear_config()

  _, started, seconds = _run_watched(_eval(lib, tmp_path / "reference"), tmp_path / "reference")
  per_unit = (seconds - started) / 24
  killed = tmp_path / "killed"
  moments = []
  for _ in range(3 * KILLS):
    if len(moments) == KILLS:
      break
    moment = rng.uniform(0, 3 * per_unit)
    if _run_watched(_eval(lib, killed), killed, kill_after=moment)[0]:
      moments.append(round(moment, 2))
  print(f"eval killed {len(moments)} times, at these seconds after its start line:", moments)
  assert len(moments) == KILLS, f"only {len(moments)} of {KILLS} kills landed on a running process"
  _run_watched(_eval(lib, killed), killed)
  assert _reports(killed) == _reports(tmp_path / "reference")
  log = [json.loads(line) for line in open(killed / "log.jsonl") if line.strip().endswith("}")]  # a kill may cut the last line
  computed = [r["unit"] for r in log if r["event"] == "unit"]
  assert len(computed) == len(set(computed)), f"units computed twice: {sorted(computed)}"
  assert set(computed) <= set(range(24))
  # Each run skipped at least the units the runs before it logged (a unit whose file was written
  # just before a kill is skipped without a log line).
  logged = 0
  for record in log:
    if record["event"] == "start":
      assert record["skipped"] >= logged, log
    else:
      logged += 1
