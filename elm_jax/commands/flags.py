"""Command-line flag types that refuse a bad value when the command line is parsed, before any
work: `--batch_size=0` ends as `elm-jax score: error: argument --batch_size: expected a positive
integer, got '0'` (exit status 2)."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
  """An integer >= 1."""
  return _integer(text, 1, "a positive integer")


def token_length(text: str) -> int:
  """A token budget that holds at least one token besides EOS (an integer >= 2)."""
  return _integer(text, 2, "an integer of at least 2 (one token plus EOS)")


def fraction(text: str) -> float:
  """A number in (0, 1]."""
  value = finite_float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
  return value


def finite_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def _integer(text: str, minimum: int, expected: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
  return value


def add_integrity_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--skip_integrity_check", action="store_true",
                      help="load library files without comparing them with the manifest's sha256 "
                           "(each such load prints a warning)")


def positive_int_or_all(text: str):
  """A positive integer, or 'all' (None: no limit)."""
  if text == "all":
    return None
  return _integer(text, 1, "a positive integer or 'all'")


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Flags that run the command as one of several JAX processes (every process runs the same
  command line with its own --process_id; or --distributed_auto where JAX finds the cluster)."""
  group = parser.add_argument_group("multi-process (TPU pods, multi-GPU hosts)")
  group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  group.add_argument("--num_processes", type=positive_int, default=None)
  group.add_argument("--process_id", type=int, default=None, help="0 .. num_processes - 1")
  group.add_argument("--distributed_auto", action="store_true",
                     help="let JAX detect the cluster (TPU pod slices, SLURM, ...)")
  group.add_argument("--heartbeat_timeout", type=positive_int, default=60,
                     help="seconds without a heartbeat after which a process counts as failed and "
                          "the others stop, naming it")
