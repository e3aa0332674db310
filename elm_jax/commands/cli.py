"""`elm-jax`: the command line. Subcommands live in their own modules, imported on use: a
subcommand's module imports JAX, TensorFlow and SeqIO (seconds), which `elm-jax --help` and
`elm-jax tasks list` do not need; that lazy import is the one kept on purpose.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`. Gin flags in
the t5x form (`--gin_file=...`, `--gin.NAME=VALUE`, `--gin_search_paths=...`) may appear
anywhere and are parsed before the subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

import elm_jax
from elm_jax import compile_cache
from elm_jax.commands import flags, gin_utils, host_memory
from elm_jax.errors import UserInputError

SUBCOMMANDS = {
    "demo": ("elm_jax.commands.demo_command",
             "the paper's experiments in miniature on the built-in suite, with a report"),
    "score": ("elm_jax.commands.score_command",
              "rank-classify JSONL examples with a T5 checkpoint"),
    "train": ("elm_jax.commands.train_command",
              "train experts (vmapped) or the multitask baseline from a gin run file"),
    "plan": ("elm_jax.commands.plan_command",
             "will a training recipe fit a pod? per-device memory and FLOPs of its programs, no weights"),
    "eval": ("elm_jax.commands.eval_command",
             "evaluate library experts on every prompt of a task or mixture"),
    "library": ("elm_jax.commands.library_command",
                "manage an Expert Library: add, list, show, remove, verify, export"),
    "retrieve": ("elm_jax.commands.retrieve_command",
                 "rank a library's experts for an unseen task (RoE, likelihood, oracle)"),
    "route": ("elm_jax.commands.route_command",
              "route a library's experts per token or per example on a task (uniform, Arrow, retrieval)"),
    "train-gates": ("elm_jax.commands.gates_command",
                    "train PHATGOOSE gates for a library's experts (then `route --method=phatgoose`)"),
    "merge": ("elm_jax.commands.merge_command", "merge library experts into a new expert"),
    "embed": ("elm_jax.commands.embed_command", "embed one text per line with MiniLM or a T5 encoder"),
    "tasks": ("elm_jax.commands.tasks_command", "list the ELM task inventory and its mixtures (no data needed)"),
    "version": ("elm_jax.commands.cli", "print the versions of elm_jax and its numerical stack"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """`version` takes no arguments."""


def main_version(args: argparse.Namespace) -> int:
  import flax  # lazily, like a subcommand's own imports
  import jax
  print(f"elm_jax {elm_jax.__version__}  jax {jax.__version__}  flax {flax.__version__}  "
        f"devices {jax.device_count()} x {jax.devices()[0].platform}")
  return 0


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="elm-jax", description="Expert Language Models in JAX.",
      epilog="Gin flags: --gin_file=PATH (repeatable), --gin.NAME=VALUE (repeatable), "
             "--gin_search_paths=DIR,DIR")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(_module=module)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _build_parser()
  try:
    argv, gin_flags = gin_utils.split_gin_flags(argv)
  except gin_utils.GinFlagError as e:
    parser.print_usage(sys.stderr)
    print(f"elm-jax: error: {e}", file=sys.stderr)
    return 2
  command = next((a for a in argv if not a.startswith("-")), None)
  if command is None or command not in SUBCOMMANDS:
    if command is not None:
      parser.print_usage(sys.stderr)
      print(f"elm-jax: error: unknown command {command!r}; expected one of "
            f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
      return 2
    parser.print_help()
    return 0 if "-h" in argv or "--help" in argv else 2
  module = importlib.import_module(SUBCOMMANDS[command][0])
  sub_parser = argparse.ArgumentParser(prog=f"elm-jax {command}",
                                       description=SUBCOMMANDS[command][1])
  module.add_arguments(sub_parser)
  position = argv.index(command)
  try:
    args = sub_parser.parse_args(argv[:position] + argv[position + 1:])
  except SystemExit as e:  # argparse has printed the usage and the error (or the --help)
    return int(e.code or 0)
  host_memory.keep_freed_memory()  # before the first large allocation
  try:
    if flags.distributed_flags_given(args):  # checked together: a flag given alone is refused
      from elm_jax import partitioning  # lazy, like the subcommands: it imports JAX
      partitioning.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                          auto=args.distributed_auto,
                                          heartbeat_timeout_seconds=args.heartbeat_timeout,
                                          initialization_timeout_seconds=args.initialization_timeout,
                                          program=f"elm-jax {command}")
    gin_utils.parse_gin(gin_flags)
    if command != "version":
      compile_cache.enable()
    run = main_version if command == "version" else module.main
    return run(args)
  except UserInputError as e:  # names the file, the field and what was expected
    print(f"elm-jax {command}: error: {gin_utils.without_gin_context(str(e))}", file=sys.stderr)
    return 2
  except BrokenPipeError:
    # The reader of our output went away (`elm-jax tasks list | head -1`): stop quietly, as a
    # Unix tool killed by SIGPIPE does, and keep the interpreter from complaining at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
  except OSError as e:  # a full disk (or a read-only one) under a write that files.py did not make
    from elm_jax import files  # lazy, like the subcommands: it imports etils
    message = files.describe_write_error(e)
    if message is None:
      raise
    print(f"elm-jax {command}: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"elm-jax {command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
