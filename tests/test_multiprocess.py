"""Two real JAX processes on this machine (2 processes x 4 fake CPU devices, on localhost, CPU
collectives over gloo), started by the tests with a bounded timeout, against one process with
8 devices: training gives the same experts; both processes killed and restarted resume to the
same final state; scoring across the processes equals scoring in one; eval writes one set of
result files with the same numbers; a process that dies makes the other stop, naming it, within
its heartbeat timeout instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds any run may take before the test fails
TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of",
         "builtin_paraphrase_same_meaning"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _command(*argv) -> list[str]:
  return [sys.executable, "-m", "elm_jax.commands.cli", *argv]


def _train_args(model_dir, steps=4) -> list[str]:
  return ["train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin", "--gin_file=runs/train_builtin_experts.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.EXPERT_TASKS={TASKS!r}", f"--gin.TRAIN_STEPS={steps}",
          "--gin.BATCH_SIZE=2", "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=8", "--gin.run.train.save_every=1",
          "--gin.t5_config.T5Config.num_encoder_layers=1", "--gin.t5_config.T5Config.num_decoder_layers=1",
          # (data, expert) mesh: 2-way data parallel, 4 experts at once over 8 devices.
          "--gin.MESH_CONFIG=@partitioning.MeshConfig()", "--gin.partitioning.MeshConfig.data=2",
          "--gin.partitioning.MeshConfig.expert=4", "--gin.partitioning.MeshConfig.model=1"]


def _one_process(argv) -> subprocess.CompletedProcess:
  proc = subprocess.run(_command(*argv), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _start_two(argv, heartbeat: int = 10) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(_command(*argv, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                    f"--process_id={p}", f"--heartbeat_timeout={heartbeat}"),
                           cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for p in range(2)]


def _two_processes(argv) -> list[tuple[str, str]]:
  procs = _start_two(argv)
  outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _experts(model_dir) -> dict:
  root = os.path.join(model_dir, "experts")
  return {e: load_file(os.path.join(root, e, "tensors.safetensors")) for e in sorted(os.listdir(root))}


def _assert_same_experts(a, b) -> None:
  assert sorted(a) == sorted(b) == sorted(TASKS)
  for name in a:
    assert sorted(a[name]) == sorted(b[name])
    for key in a[name]:
      # Two programs of ours (one process or two): the same partitioned step; float32, 1e-6.
      np.testing.assert_allclose(a[name][key], b[name][key], rtol=1e-6, atol=1e-6, err_msg=f"{name}/{key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The experts of one process with 8 devices, and a library of them."""
  root = tmp_path_factory.mktemp("one_process")
  _one_process(_train_args(root / "run"))
  _one_process(["library", "add", f"--library={root / 'lib'}", "--keys=none", str(root / "run")])
  return root


def test_two_processes_train_the_same_experts_as_one(reference, tmp_path):
  _two_processes(_train_args(tmp_path / "run"))
  _assert_same_experts(_experts(reference / "run"), _experts(tmp_path / "run"))
  assert {"2", "3", "4"} <= set(os.listdir(tmp_path / "run" / "checkpoints"))  # written by both


def test_both_killed_and_restarted_resume_to_the_same_experts(reference, tmp_path):
  procs = _start_two(_train_args(tmp_path / "run"))
  deadline = time.monotonic() + TIMEOUT
  checkpoints = tmp_path / "run" / "checkpoints"
  while not (checkpoints / "2").is_dir():  # killed after the second step's checkpoint
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=TIMEOUT)
  assert not (tmp_path / "run" / "experts").exists()
  _two_processes(_train_args(tmp_path / "run"))
  _assert_same_experts(_experts(reference / "run"), _experts(tmp_path / "run"))


def test_scoring_and_eval_across_two_processes(reference, tmp_path):
  examples = tmp_path / "in.jsonl"
  examples.write_text("".join(json.dumps({"id": i, "inputs": f"Review {i}: good. Positive?", "choices": ["yes", "no", "maybe"][:2 + i % 2]}) + "\n"
                              for i in range(7)))
  lib = reference / "lib"
  _one_process(["score", f"--library={lib}", f"--input={examples}", f"--output={tmp_path / 'one.jsonl'}"])
  _two_processes(["score", f"--library={lib}", f"--input={examples}", f"--output={tmp_path / 'two.jsonl'}"])
  one = [json.loads(l) for l in open(tmp_path / "one.jsonl")]
  two = [json.loads(l) for l in open(tmp_path / "two.jsonl")]
  assert [r["id"] for r in two] == list(range(7)) and [r["prediction"] for r in two] == [r["prediction"] for r in one]
  for a, b in zip(one, two):
    for expert in a["scores"]:  # each process scores its share on its own devices: same programs
      np.testing.assert_allclose(b["scores"][expert], a["scores"][expert], rtol=1e-6)
  # One mesh over both processes' 8 devices: experts 4 ways, batch rows 2 ways.
  args = ["eval", f"--library={lib}", "--task=builtin_nli_gpt3_style", "--max_examples=9", "--batch_size=4",
          "--mesh=data:2,expert:4", "--no_progress"]
  _one_process(args + [f"--output_dir={tmp_path / 'eval_one'}"])
  outs = _two_processes(args + [f"--output_dir={tmp_path / 'eval_two'}"])
  assert all("8 cpu devices in 2 process(es) as 2 data x 4 expert x 1 model" in err for _, err in outs)
  assert sorted(os.listdir(tmp_path / "eval_two")) == ["log.jsonl", "predictions", "results.csv", "results.json",
                                                       "results.md", "tensorboard", "units"]
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # one writer, no leftovers
  one_results = json.load(open(tmp_path / "eval_one" / "results.json"))["tasks"]
  two_results = json.load(open(tmp_path / "eval_two" / "results.json"))["tasks"]
  assert [t["metrics"] for t in two_results] == [t["metrics"] for t in one_results]
  assert [t["examples"] for t in two_results] == [9]  # each example counted once


def test_a_failed_process_stops_the_other_naming_it(reference, tmp_path):
  """Process 1 is killed once both are training; process 0 must stop within its heartbeat
  timeout (5 s here) plus slack, naming task 1, not hang (JAX aborts it: exit status 134)."""
  procs = _start_two(_train_args(tmp_path / "run", steps=2000), heartbeat=5)
  checkpoints = tmp_path / "run" / "checkpoints"
  deadline = time.monotonic() + TIMEOUT
  while not (checkpoints / "1").is_dir():  # both connected and training
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  start = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  procs[1].communicate(timeout=30)
  assert procs[0].returncode != 0
  assert time.monotonic() - start < 60
  assert "unhealthy" in err and "stopped sending heartbeats" in err, err[-2000:]
  assert "heartbeats):\n1" in err  # the failed process's id
