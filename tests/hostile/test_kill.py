"""kill -9 at random moments of `train`, `library add` and `merge` (3 + 5 + 3 = 11 kills), each
followed by a rerun of the same command: afterwards `library verify` passes and the result is
the same as that of a run never interrupted (expert tensors bit for bit, the same library).

The kill moments are drawn uniformly from 30% to 90% of an uninterrupted run's wall time (the
first 30% is Python and TensorFlow start-up, which touches no file), from a seeded
generator: set ELM_KILL_SEED to replay a failure; the seed in use is printed. The test bounds
its own time: every process is waited for with a timeout.

`library remove` (5 kills, each of a fresh copy of one library) is killed at a moment drawn
from the span of its file work instead: start-up is most of its wall time and touches nothing,
so the moment is counted from the removal's first write (its `.trash/` directory appearing),
up to 1.2 x the span an uninterrupted remove takes (until its `.trash/` is gone). After each kill the library is as it was
(verify passes, the expert whole) or holds a removal that verify reports with `verify
--repair`; the same remove again (or `verify --repair`) then gives the library an
uninterrupted remove gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import gin
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300  # seconds any one command may take before the test fails
TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of"]
pytestmark = pytest.mark.slow


def _command(*argv) -> list[str]:
  return [sys.executable, "-m", "elm_jax.commands.cli", *argv]


def _train(model_dir) -> list[str]:
  return _command("train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin",
                  "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{model_dir}'",
                  f"--gin.EXPERT_TASKS={TASKS!r}", "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=2",
                  "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=8",
                  "--gin.run.train.save_every=1",
                  "--gin.t5_config.T5Config.num_encoder_layers=1",
                  "--gin.t5_config.T5Config.num_decoder_layers=1")


def _run(argv) -> float:
  """Runs a command to completion; returns its wall time."""
  start = time.perf_counter()
  proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return time.perf_counter() - start


def _kill_then_finish(argv, seconds: float, rng: random.Random, kills: int) -> list[float]:
  """Starts the command and kills it (-9) at a random moment until `kills` kills have landed
  on a running process (a run that ended before its moment counts for nothing; at most
  3 x `kills` tries); then runs it to the end. Returns the moments that landed."""
  moments = []
  for _ in range(3 * kills):
    if len(moments) == kills:
      break
    moment = rng.uniform(0.3, 0.9) * seconds
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      proc.wait(timeout=moment)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=TIMEOUT)
      moments.append(round(moment, 2))
  assert len(moments) == kills, f"only {len(moments)} of {kills} kills landed on a running process"
  _run(argv)
  return moments


def _digests(directory) -> dict[str, str]:
  return {os.path.relpath(os.path.join(b, f), directory): hashlib.sha256(open(os.path.join(b, f), "rb").read()).hexdigest()
          for b, _, names in os.walk(directory) for f in names}


def _library_state(lib) -> dict:
  """What an add or merge decides: names, entries' files and keys (not times or sources)."""
  manifest = json.load(open(os.path.join(lib, "manifest.json")))
  return {name: {"files": e["files"], "keys_file": e.get("keys_file"), "directory": e["directory"],
                 "merged_from": (e.get("provenance") or {}).get("merged_from")}
          for name, e in manifest["experts"].items()}


def _verify(lib) -> None:
  proc = subprocess.run(_command("library", "verify", f"--library={lib}"), cwd=REPO, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_kill_at_random_points_then_rerun(tmp_path):
  seed = int(os.environ.get("ELM_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
  print(f"ELM_KILL_SEED={seed}")
  rng = random.Random(seed)

  # train: uninterrupted, then killed 3 times and resumed.
  seconds = _run(_train(tmp_path / "train_ref"))
  moments = _kill_then_finish(_train(tmp_path / "train_killed"), seconds, rng, 3)
  print("train killed at", moments)
  for task in TASKS:
    ref, got = (tmp_path / run / "experts" / task for run in ("train_ref", "train_killed"))
    assert _digests(ref)["tensors.safetensors"] == _digests(got)["tensors.safetensors"], task
    assert json.load(open(ref / "expert.json"))["metrics"] == json.load(open(got / "expert.json"))["metrics"]

  # library add: uninterrupted, then killed 5 times and rerun.
  run = tmp_path / "train_ref"
  add = lambda lib: _command("library", "add", f"--library={lib}", str(run))  # noqa: E731
  seconds = _run(add(tmp_path / "lib_ref"))
  moments = _kill_then_finish(add(tmp_path / "lib_killed"), seconds, rng, 5)
  print("library add killed at", moments)
  _verify(tmp_path / "lib_killed")
  assert _library_state(tmp_path / "lib_killed") == _library_state(tmp_path / "lib_ref")

  # merge: uninterrupted, then killed 3 times and rerun.
  merge = lambda lib: _command("merge", f"--library={lib}", f"--experts={','.join(TASKS[:2])}",  # noqa: E731
                               "--name=merged")
  seconds = _run(merge(tmp_path / "lib_ref"))
  moments = _kill_then_finish(merge(tmp_path / "lib_killed"), seconds, rng, 3)
  print("merge killed at", moments)
  _verify(tmp_path / "lib_killed")
  assert _library_state(tmp_path / "lib_killed") == _library_state(tmp_path / "lib_ref")


def _remove_killed_in_its_file_work(argv, lib, delay: float) -> bool:
  """Runs `library remove` and kills it (-9) `delay` seconds after its first write (its
  `.trash/` appearing); returns whether the kill landed on a running process."""
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + TIMEOUT
  try:
    while not os.path.exists(os.path.join(lib, ".trash")):
      if proc.poll() is not None:
        return False
      assert time.monotonic() < deadline, "library remove did not start removing"
      time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is not None:
      return False
    proc.send_signal(signal.SIGKILL)
    return True
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=TIMEOUT)


def _files(lib) -> dict[str, str]:
  """sha256 of every file of a library but its manifest and history (whose times differ)."""
  return {k: v for k, v in _digests(lib).items() if k not in ("manifest.json", "history.jsonl")}


def test_kill_library_remove_then_rerun(made, tmp_path):
  from elm_jax.commands import cli
  from elm_jax.library.store import ExpertLibrary
  seed = int(os.environ.get("ELM_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
  print(f"ELM_KILL_SEED={seed}")
  rng = random.Random(seed)
  name = "builtin_sentiment_is_positive"
  base = tmp_path / "base"
  shutil.copytree(made / "lib", base)
  # Thousands of files in the expert's directory (as the half-removed expert had) and a
  # cached embedding, so its removal has a span of file work to be killed in.
  extra = base / "experts" / name / "extra"
  extra.mkdir()
  for i in range(4000):
    (extra / f"{i:05d}").write_bytes(b"x" * 64)
  cache = base / "retrieval" / "embeddings" / "t5" / "label_instance" / f"{name}.npy"
  cache.parent.mkdir(parents=True)
  cache.write_bytes(b"cached")
  remove = lambda lib: _command("library", "remove", f"--library={lib}", name)  # noqa: E731

  reference = tmp_path / "reference"
  shutil.copytree(base, reference)
  proc = subprocess.Popen(remove(reference), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  while not os.path.exists(reference / ".trash") and proc.poll() is None:
    time.sleep(0.001)
  start = time.perf_counter()
  while os.path.exists(reference / ".trash") and proc.poll() is None:
    time.sleep(0.001)
  span = time.perf_counter() - start  # from the first write to the last
  assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()[-3000:]
  want = (_library_state(reference), _files(reference))
  assert name not in want[0] and not (reference / ".trash").exists()

  moments, states = [], []
  for attempt in range(15):
    if len(moments) == 5:
      break
    lib = tmp_path / f"killed_{attempt}"
    shutil.copytree(base, lib)
    delay = rng.uniform(0, 1.2 * span)
    if not _remove_killed_in_its_file_work(remove(lib), lib, delay):
      continue
    moments.append(round(delay, 3))
    library = ExpertLibrary(lib)
    problems = library.verify()
    if any(f"an interrupted `library remove` of {name!r}" in p for p in problems):
      states.append("pending")
      assert all("--repair" in p for p in problems), problems
      finish = ["library", "verify", "--repair"] if len(moments) % 2 else ["library", "remove", name]
    else:
      assert all("left by an interrupted `library remove`" in p for p in problems), problems
      states.append("old" if name in library.names() else "removed")
      if name in library.names():
        assert {k: v for k, v in _files(lib).items() if not k.startswith(".trash")} == _files(base)
      finish = ["library", "remove", name]
    assert cli.main([*finish, f"--library={lib}"]) == 0
    gin.clear_config()
    assert ExpertLibrary(lib).verify() == []
    assert (_library_state(lib), _files(lib)) == want, (attempt, delay)
  print(f"library remove (file work {span:.2f} s) killed at", moments, "leaving", states)
  assert len(moments) == 5, f"only {len(moments)} of 5 kills landed on a running remove"
