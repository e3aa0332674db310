"""The hostile-input harness shared by `tests/hostile/`: a fresh world per case, a tree
snapshot (sha256 of every file, the target of every link) taken before and after the command,
and the assertions every case makes.

`run_case` asserts: the exit status; exactly one line of stderr saying `error:` that matches
the case's message (no traceback); and that every file that existed before, in the case's
world and in the prepared run and library, is byte-identical afterwards and nothing new was
left behind (except the paths a case says a successful command writes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Callable, Optional

import gin

from elm_jax.commands import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_LAYER = ["--gin.t5_config.T5Config.num_encoder_layers=1", "--gin.t5_config.T5Config.num_decoder_layers=1"]
TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic"]


def train_args(model_dir, tasks=TASKS, *extra):
  """`elm-jax train` of the built-in experts on a one-layer mini T5; `tasks` is a list of task
  names, or any other value to bind as it is."""
  return ["train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin",
          "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.EXPERT_TASKS={tasks!r}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
          "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=8", *ONE_LAYER, *extra]



def snapshot(*roots) -> dict[str, str]:
  out = {}
  for root in roots:
    for base, dirs, names in os.walk(root):
      for name in names + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
        path = os.path.join(base, name)
        if os.path.islink(path):
          out[path] = "link:" + os.readlink(path)
        elif os.path.isfile(path):
          out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
      for d in dirs:
        out.setdefault(os.path.join(base, d) + "/", "dir")
  return out


@dataclasses.dataclass
class World:
  """A fresh directory for one case, with copies of the prepared run and library."""
  root: str
  made: str

  def path(self, *parts) -> str:
    return os.path.join(self.root, *parts)

  def library(self) -> str:
    lib = self.path("lib")
    if not os.path.exists(lib):
      shutil.copytree(os.path.join(self.made, "lib"), lib)
    return lib

  def run_dir(self) -> str:
    run = self.path("run")
    if not os.path.exists(run):
      shutil.copytree(os.path.join(self.made, "run"), run, symlinks=True)
    return run

  def write(self, name: str, data: str | bytes) -> str:
    path = self.path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    return path

  def manifest(self, edit: Callable[[dict], None]) -> None:
    path = os.path.join(self.library(), "manifest.json")
    manifest = json.load(open(path))
    edit(manifest)
    json.dump(manifest, open(path, "w"))

  def flip_byte(self, expert: str = TASKS[0], file: str = "tensors.safetensors") -> None:
    path = os.path.join(self.library(), "experts", expert, file)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x10  # inside the tensor data, not the header
    open(path, "wb").write(bytes(data))

  def examples(self, name: str = "in.jsonl") -> str:
    return self.write(name, '{"id": 0, "inputs": "Review: great film. Positive?", "choices": ["yes", "no"]}\n'
                            '{"id": 1, "inputs": "Review: dull. Positive?", "choices": ["yes", "no"]}\n')


@dataclasses.dataclass
class Case:
  name: str
  setup: Callable[[World], list[str]]          # prepares files, returns the argv
  status: int = 2
  message: Optional[str] = None               # regex the `error:` line must match
  writes: tuple[str, ...] = ()                # paths (relative to the world) a success may add or change
  stdout: Optional[str] = None                # regex stdout must match


def lib_arg(w: World) -> str:
  return f"--library={w.library()}"


def user_model_dir(w: World) -> str:
  """A MODEL_DIR that already holds a user's files and another expert."""
  model_dir = w.path("model")
  w.write("model/notes.txt", "my notes")
  w.write("model/experts/other/expert.json", "{}")
  return model_dir


def run_case(case: Case, made, tmp_path, capsys) -> None:
  """Prepares `case` in a fresh world under `tmp_path`, runs its command in this process and
  makes the assertions above."""
  world = World(str(tmp_path / "world"), str(made))
  os.makedirs(world.root)
  argv = case.setup(world)
  gin.clear_config()
  before = snapshot(world.root, made)
  capsys.readouterr()
  status = cli.main(argv)
  gin.clear_config()
  out, err = capsys.readouterr()
  assert "Traceback" not in err, err
  assert "In call to configurable" not in err, err  # gin's context is not a second error line
  assert status == case.status, f"exit {status}\nstdout:\n{out}\nstderr:\n{err}"
  if case.message is not None:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert re.search(case.message, errors[0]), errors[0]
  if case.stdout is not None:
    assert re.search(case.stdout, out), out
  assert "Path not found" not in err  # gin's resource reader stays quiet
  after = snapshot(world.root, made)
  allowed = {world.path(p) for p in case.writes}
  assert {k: v for k, v in after.items() if k not in allowed} == \
         {k: v for k, v in before.items() if k not in allowed}


def run_command(argv) -> int:
  """`elm-jax ARGV` in this process, with gin's global config cleared before and after."""
  gin.clear_config()
  try:
    return cli.main(argv)
  finally:
    gin.clear_config()
