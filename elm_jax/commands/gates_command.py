"""`elm-jax train-gates`: PHATGOOSE gates for a library's experts, trained after them with the
experts frozen (`library/gates.py`), then usable by `elm-jax route --method=phatgoose`.

    elm-jax train-gates --library=LIB --model_dir=/tmp/gates --steps=100
    elm-jax train-gates --library=LIB --model_dir=/tmp/gates --experts=a,b --tasks=a=TASK_A

Every selected expert without gates trains its gate vectors (one per routed module) on its own
training task, all experts in one vmapped program; checkpoints go to --model_dir, so the same
command started again after a kill resumes there. Prints one line per expert.
"""

from __future__ import annotations

import argparse
import sys

from elm_jax import defaults
from elm_jax.commands import flags, gin_utils, run_files
from elm_jax.errors import UserInputError
from elm_jax.library import gates
from elm_jax.training import gates as gate_training
from tasks import instances


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--library", required=True, help="Expert Library directory")
  parser.add_argument("--model_dir", required=True,
                      help="directory of the gate run's checkpoints and log (a killed run resumes there)")
  parser.add_argument("--experts", default="all", help="experts: all or NAME,NAME,... (those with gates are skipped)")
  parser.add_argument("--steps", type=flags.positive_int, default=gate_training.GATE_STEPS)
  parser.add_argument("--learning_rate", type=float, default=gate_training.GATE_LEARNING_RATE)
  parser.add_argument("--batch_size", type=flags.positive_int, default=8)
  parser.add_argument("--input_length", type=flags.positive_int, default=defaults.TRAIN_INPUT_LENGTH)
  parser.add_argument("--target_length", type=flags.positive_int, default=defaults.TRAIN_TARGET_LENGTH)
  parser.add_argument("--seed", type=int, default=defaults.SEED)
  parser.add_argument("--save_every", type=flags.positive_int, default=100)
  parser.add_argument("--tasks", default=None,
                      help="NAME=TASK,... : the task an expert's gates train on (default: the one its "
                           "expert.json records)")
  parser.add_argument("--checkpoint", default=None, help="backbone (default: the one the library records)")
  parser.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  parser.add_argument("--mesh", default=None,
                      help="data:D,expert:E,model:M: split the run over the devices, experts on `expert` "
                           "(default: one device)")
  flags.add_integrity_flag(parser)


def parse_tasks(text: str | None) -> dict[str, str]:
  """'a=TASK_A,b=TASK_B' -> {'a': 'TASK_A', 'b': 'TASK_B'}."""
  out = {}
  for item in (text or "").split(","):
    if not item:
      continue
    name, sep, task = item.partition("=")
    if not sep or not name or not task:
      raise UserInputError(f"--tasks: expected NAME=TASK,..., got {item!r}")
    out[name] = task
  return out


def main(args: argparse.Namespace) -> int:
  instances.register_setup(args.setup)
  result = gates.train_gates(args.library, args.model_dir, args.experts, steps=args.steps,
                             learning_rate=args.learning_rate, batch_size=args.batch_size,
                             input_length=args.input_length, target_length=args.target_length, seed=args.seed,
                             save_every=args.save_every, tasks=parse_tasks(args.tasks), checkpoint=args.checkpoint,
                             check_integrity=not args.skip_integrity_check,
                             config=gin_utils.model_config_or_none(), mesh_config=run_files.mesh_config(args.mesh))
  for name in result.trained:
    loss = result.metrics.get(name, {}).get("loss")
    print(f"{name}\tgates trained\t" + (f"loss {loss:.4f}" if loss is not None else "(resumed a finished run)"))
  for name in result.skipped:
    print(f"{name}\tgates already recorded: skipped")
  print(f"{len(result.trained)} expert(s) gated in {args.library}", file=sys.stderr)
  return 0
