"""Hostile flags: values of the right type that make no sense (a softmax cut below the answer
tokens, a pod of 100,000 fake devices, 10^8 answer choices, multi-process flags given alone,
a recipe group of 1.5), a coordinator that never answers, and two `train` runs on one MODEL_DIR.

Each case either ends with exit status 2 and one line naming the flag or binding and what was
expected (no traceback, no gin "In call to configurable" context, every pre-existing file
byte-identical: `tests/hostile/harness.py`), or does the right thing. Cases that need processes
of their own (a coordinator that never answers, `--distributed_auto` on a machine without a
cluster, a train that holds MODEL_DIR) are plain tests with bounded timeouts.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from elm_jax.commands import cli
from elm_jax.vocabularies import SentencePieceVocabulary
from tests.hostile.harness import REPO, TASKS, Case, World, lib_arg, run_case, train_args

TINY_PLAN = ["plan", "--devices=8", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/train_experts.gin",
             "--gin.EXPERT_TASKS=['a', 'b']", "--gin.BATCH_SIZE=8"]
XL_DRY_RUN = ["train", "--dry_run", "--gin_file=experiments/elm_prompt_experts_xl.gin"]
LOCK = "train.lock"


def _score(w: World, *extra) -> list[str]:
  return ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", *extra]


def _vocabulary_size(w: World) -> int:
  return SentencePieceVocabulary(os.path.join(w.made, "run", "backbone", "spiece.model")).vocab_size


def _dry_run(w: World, *extra) -> list[str]:
  return [*XL_DRY_RUN, f"--gin.MODEL_DIR='{w.path('m')}'", *extra]


CASES = [
    # ------------------------------------------------------------ the softmax cut (item 8)
    Case("score: --softmax_vocab_size=3, below every answer token",
         lambda w: _score(w, "--softmax_vocab_size=3"),
         message=r"--softmax_vocab_size=3: below token id \d+ of choice 'yes' \(.*in.jsonl, id 0\); "
                 r"expected at least \d+"),
    Case("score: --softmax_vocab_size above the choices' tokens but below the vocabulary's",
         lambda w: _score(w, "--softmax_vocab_size=100"),
         message=r"--softmax_vocab_size=100: below the vocabulary's \d+ tokens \(.*spiece.model\).*"
                 r"expected at least \d+"),
    Case("score: --checkpoint without a library, --softmax_vocab_size=3",
         lambda w: ["score", f"--checkpoint={os.path.join(w.run_dir(), 'backbone')}", f"--input={w.examples()}",
                    f"--output={w.path('o.jsonl')}", "--softmax_vocab_size=3"],
         message=r"--softmax_vocab_size=3: below token id \d+ of choice 'yes'"),
    Case("score: --softmax_vocab_size equal to the vocabulary's size scores",
         lambda w: _score(w, f"--softmax_vocab_size={_vocabulary_size(w)}"),
         status=0, writes=("o.jsonl",)),
    Case("eval: --softmax_vocab_size=3 (used to report accuracies)",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.path('ev')}",
                    "--max_examples=4", "--softmax_vocab_size=3"],
         message=r"--softmax_vocab_size=3: below the vocabulary's \d+ tokens .*expected at least \d+"),
    # ------------------------------------------------------------ plan: devices and extents (items 10, 11)
    Case("plan: --devices=100000 (used to grow past 3 GB and never answer)",
         lambda w: [*TINY_PLAN[:1], "--devices=100000", *TINY_PLAN[2:]],
         message=r"argument --devices: expected 1 \.\. 2048 .*got '100000'"),
    Case("plan: --devices=2049, one past what XLA:CPU compiles for",
         lambda w: [*TINY_PLAN[:1], "--devices=2049", *TINY_PLAN[2:]],
         message=r"argument --devices: expected 1 \.\. 2048"),
    Case("plan: --score_choices=10^15 (used to abort in XLA: overflow in static extent product)",
         lambda w: [*TINY_PLAN, "--score_choices=1000000000000000"],
         message=r"--score_choices=1000000000000000: .*expected at most \d+"),
    Case("plan: --score_batch_size=10^12",
         lambda w: [*TINY_PLAN, "--score_batch_size=1000000000000"],
         message=r"--score_batch_size=1000000000000: .*expected at most \d+"),
    Case("plan: INPUT_LENGTH=10^12 of the train step",
         lambda w: [*TINY_PLAN, "--no_scoring", "--gin.INPUT_LENGTH=1000000000000"],
         message=r"INPUT_LENGTH=1000000000000: .*expected at most \d+"),
    Case("plan: 10^8 choices of the XL prompt-expert recipe (a 10^19-byte logits array)",
         lambda w: ["plan", "--devices=8", "--gin_file=experiments/elm_prompt_experts_xl.gin",
                    "--score_choices=100000000"],
         message=r"--score_choices=100000000: the scorer's .* bytes, more than XLA can address .*"
                 r"expected at most \d+"),
    Case("plan: a mesh axis of 10^9 devices",
         lambda w: [*TINY_PLAN, "--gin.MESH_CONFIG=@partitioning.MeshConfig()",
                    "--gin.partitioning.MeshConfig.expert=1000000000"],
         message=r"MeshConfig.*8 devices are not divisible by the fixed axes \(1000000000\)"),
    # ------------------------------------------------------------ multi-process flags
    Case("score: --process_id given alone (used to be ignored)",
         lambda w: _score(w, "--process_id=7"),
         message=r"--process_id=7: given without --num_processes; .*--coordinator_address=HOST:PORT "
                 r"--num_processes=N --process_id=0\.\.N-1"),
    Case("score: --process_id=0 given alone",
         lambda w: _score(w, "--process_id=0"),
         message=r"--process_id=0: given without --num_processes"),
    Case("score: --coordinator_address given alone (used to be ignored)",
         lambda w: _score(w, "--coordinator_address=localhost:1234"),
         message=r"--coordinator_address=localhost:1234: given without --num_processes"),
    Case("score: --num_processes=1 --process_id=7",
         lambda w: _score(w, "--num_processes=1", "--process_id=7"),
         message=r"--process_id=7: expected 0 \.\. 0 \(--num_processes=1\)"),
    Case("score: --num_processes=2 without --coordinator_address",
         lambda w: _score(w, "--num_processes=2", "--process_id=1"),
         message=r"--num_processes=2: needs --coordinator_address=HOST:PORT"),
    Case("score: --distributed_auto with --num_processes",
         lambda w: _score(w, "--distributed_auto", "--num_processes=2"),
         message=r"--distributed_auto: give it alone"),
    Case("score: --initialization_timeout=0",
         lambda w: _score(w, "--initialization_timeout=0"),
         message=r"argument --initialization_timeout: expected a positive integer"),
    # ------------------------------------------------------------ train --dry_run and recipes
    Case("train --dry_run: GROUP=1.5 (used to end in TypeError)",
         lambda w: _dry_run(w, "--gin.GROUP=1.5"),
         message=r"GROUP \(plans.recipe_group.group\): expected a group number 0\.\.39 .*got 1.5"),
    Case("train --dry_run: GROUP='a'",
         lambda w: _dry_run(w, "--gin.GROUP='a'"),
         message=r"GROUP \(plans.recipe_group.group\): expected a group number 0\.\.39 .*got 'a'"),
    Case("train --dry_run: GROUP=True (used to be taken as group 1)",
         lambda w: _dry_run(w, "--gin.GROUP=True"),
         message=r"GROUP \(plans.recipe_group.group\): expected a group number 0\.\.39 .*got True"),
    Case("train --dry_run: GROUP_SIZE=2.5",
         lambda w: _dry_run(w, "--gin.GROUP_SIZE=2.5"),
         message=r"GROUP_SIZE \(plans.recipe_group.group_size\): expected a positive integer, got 2.5"),
    Case("train --dry_run: a string dropout rate (used to end in TypeError)",
         lambda w: _dry_run(w, "--gin.t5_config.T5Config.dropout_rate='0.1'"),
         message=r"T5Config.dropout_rate: expected a number in \[0, 1\), got '0.1'"),
    Case("train --dry_run: EXPERT_TASKS under an experiment file (used to be ignored)",
         lambda w: _dry_run(w, "--gin.EXPERT_TASKS=['builtin_sentiment_is_positive']"),
         message=r"EXPERT_TASKS: the recipe \(run.train.plan_group\) sets the tasks, .*would be ignored"),
    Case("train: TRAIN_STEPS under an experiment file",
         lambda w: ["train", "--gin_file=experiments/elm_prompt_experts_xl.gin", f"--gin.MODEL_DIR='{w.path('m')}'",
                    "--gin.TRAIN_STEPS=100"],
         message=r"TRAIN_STEPS: the recipe \(run.train.plan_group\) sets each expert's steps"),
    Case("train --dry_run: t0_multitask_xl.gin prints its plan (used to say it is no experiment file)",
         lambda w: ["train", "--dry_run", "--gin_file=experiments/t0_multitask_xl.gin", f"--gin.MODEL_DIR='{w.path('m')}'"],
         status=0,
         stdout=r"(?s)1 expert\(s\), trained together.*multitask \| t0_train \| 12,200 \| 1024 \| 1024/256 \| "
                r"0.001 \| constant \| 0.1 \| adafactor \(clip none\) \| full.*mesh: MeshConfig\(data=-1, expert=1, "
                r"model=4\)"),
    Case("train --dry_run: flan_moe_t0_xl.gin prints its plan",
         lambda w: ["train", "--dry_run", "--gin_file=experiments/flan_moe_t0_xl.gin", f"--gin.MODEL_DIR='{w.path('m')}'"],
         status=0,
         stdout=r"(?s)multitask \| t0_train \| 12,200 .*upcycled.*8 experts.*mesh: MeshConfig\(data=-1, expert=8"),
    # ------------------------------------------------------------ the MODEL_DIR lock
    Case("train: MODEL_DIR/train.lock a symbolic link to a file outside",
         lambda w: (w.write("outside/victim", "keep me"), os.makedirs(w.path("model")),
                    os.symlink(w.path("outside", "victim"), w.path("model", LOCK)), train_args(w.path("model")))[3],
         message=r"model/train.lock: is a symbolic link; expected the lock file of `elm-jax train`"),
    Case("train: MODEL_DIR locked by a run on another host",
         lambda w: (w.write(f"model/{LOCK}", json.dumps({"host": "otherhost.invalid", "pid": 1234,
                                                          "started": "2024-01-01T00:00:00"})),
                    train_args(w.path("model")))[1],
         message=r"MODEL_DIR=.*model: in use by `elm-jax train` pid 1234 on host 'otherhost.invalid' "
                 r"\(since 2024-01-01T00:00:00\).*if that run is no longer running, delete .*model/train.lock"),
]


class _Tee(io.TextIOBase):
  """Writes to `stream` and keeps a copy."""

  def __init__(self, stream):
    self.stream, self.copy = stream, io.StringIO()

  def write(self, text):
    self.copy.write(text)
    return self.stream.write(text)

  def flush(self):
    self.stream.flush()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_flag(case: Case, made, tmp_path, capsys, monkeypatch):
  real_main = cli.main
  seen = {}

  def main(argv):
    tee = _Tee(sys.stderr)
    monkeypatch.setattr(sys, "stderr", tee)
    try:
      return real_main(argv)
    finally:
      monkeypatch.setattr(sys, "stderr", tee.stream)
      seen["err"] = tee.copy.getvalue()
  monkeypatch.setattr("tests.hostile.harness.cli.main", main)
  run_case(case, made, tmp_path, capsys)
  assert "In call to configurable" not in seen["err"], seen["err"]  # gin's context is not the user's


# ---------------------------------------------------------------------------- processes of their own
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env() -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MEGASCALE_", "TPU_", "CLOUD_TPU_"))
         and k not in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _cli(*argv) -> list[str]:
  return [sys.executable, "-m", "elm_jax.commands.cli", *argv]


def _error_lines(err: str) -> list[str]:
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  return [line for line in err.splitlines() if "error:" in line]


def test_a_coordinator_that_never_answers_ends_in_one_line_within_the_timeout(tmp_path):
  """Process 1 of 2 whose coordinator (nobody, on a free port) never answers, and process 0 whose
  peer never comes: each ends within its --initialization_timeout with one line naming it, not
  with XLA's fatal abort minutes later."""
  args = ["score", f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'o.jsonl'}",
          "--num_processes=2", "--initialization_timeout=3"]
  start = time.monotonic()
  procs = [subprocess.Popen(_cli(*args, f"--coordinator_address=localhost:{_free_port()}", f"--process_id={p}"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in (1, 0)]
  try:
    outs = [p.communicate(timeout=60) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert time.monotonic() - start < 45
  for p, (_, err) in zip(procs, outs):
    errors = _error_lines(err)
    assert p.returncode == 2 and len(errors) == 1, err[-3000:]
    assert re.search(r"elm-jax score: error: --coordinator_address=localhost:\d+: .*within 3 s "
                     r"\(--initialization_timeout\)", errors[0]), errors[0]
  assert "no process answers at localhost" in outs[0][1]      # process 1: nothing listens there
  assert "process 0 of 2" in outs[1][1]                       # process 0: its peer never came


def test_distributed_auto_without_a_cluster_is_one_line(tmp_path):
  proc = subprocess.run(_cli("score", f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'o.jsonl'}",
                             "--distributed_auto", "--initialization_timeout=20"),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
  errors = _error_lines(proc.stderr)
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert re.search(r"elm-jax score: error: --distributed_auto: JAX found no cluster to join", errors[0]), errors[0]


def _hold_lock(model_dir) -> subprocess.Popen:
  """A process that holds MODEL_DIR's train lock as a running `elm-jax train` does (the kernel
  lock on train.lock, its host and pid inside) until it is killed."""
  os.makedirs(model_dir, exist_ok=True)
  code = ("import fcntl, json, os, socket, sys, time\n"
          f"f = open({os.path.join(str(model_dir), LOCK)!r}, 'a+')\n"
          "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
          "f.truncate(0); f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), "
          "'started': '2024-01-01T00:00:00'})); f.flush()\n"
          "print('holding', flush=True)\n"
          "time.sleep(120)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "holding"
  return proc


def test_a_second_train_on_a_model_dir_in_use_is_refused_then_takes_over_when_it_ends(made, tmp_path, capsys):
  """The second run is refused at once naming the first (host, pid); once the first has died
  (killed: its lock file is left behind), the next run takes the lock over with a note, trains,
  and removes the lock when it ends."""
  model_dir = tmp_path / "model"
  holder = _hold_lock(model_dir)
  try:
    before = sorted(os.listdir(model_dir))
    capsys.readouterr()
    start = time.monotonic()
    status = cli.main(train_args(model_dir))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert time.monotonic() - start < 30  # at once: no backbone built, no data read
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert re.search(rf"MODEL_DIR=.*model: in use by `elm-jax train` pid {holder.pid} on this host "
                     rf"\({re.escape(socket.gethostname())}, since 2024-01-01T00:00:00\)", errors[0]), errors[0]
    assert sorted(os.listdir(model_dir)) == before == [LOCK]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  assert os.path.exists(model_dir / LOCK)  # a killed holder leaves its lock file
  assert cli.main(train_args(model_dir)) == 0
  err = capsys.readouterr().err
  assert re.search(rf"note: .*train.lock: took over the lock of pid {holder.pid} on this host, which is no "
                   r"longer running", err), err
  assert os.path.isdir(model_dir / "experts" / TASKS[0]) and not os.path.exists(model_dir / LOCK)


def test_the_plan_device_bound_is_what_xla_cpu_compiles_for():
  """`flags.MAX_PLAN_DEVICES` is the most fake XLA:CPU devices one process compiles a sharded
  program for: one more fails. If a new jaxlib moves that limit, this says to move the bound."""
  from elm_jax.commands import flags
  code = ("import sys, jax, numpy as np\n"
          "from jax.sharding import Mesh, NamedSharding, PartitionSpec\n"
          "n = int(sys.argv[1])\n"
          "jax.config.update('jax_platforms', 'cpu'); jax.config.update('jax_num_cpu_devices', n)\n"
          "mesh = Mesh(np.array(jax.devices()), ('data',))\n"
          "f = jax.jit(lambda x: x.sum(), in_shardings=NamedSharding(mesh, PartitionSpec('data')))\n"
          "try:\n"
          "  f.lower(jax.ShapeDtypeStruct((n,), np.float32)).compile()\n"
          "except jax.errors.JaxRuntimeError as e:\n"
          "  print(e); sys.exit(3)\n")
  for devices, status in ((flags.MAX_PLAN_DEVICES, 0), (flags.MAX_PLAN_DEVICES + 1, 3)):
    proc = subprocess.run([sys.executable, "-c", code, str(devices)], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, (devices, proc.stdout, proc.stderr[-2000:])
  assert "Multiprocess computations aren't implemented on the CPU backend" in proc.stdout
