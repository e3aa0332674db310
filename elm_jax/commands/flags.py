"""Command-line flag types that refuse a bad value when the command line is parsed, before any
work: `--batch_size=0` ends as `elm-jax score: error: argument --batch_size: expected a positive
integer, got '0'` (exit status 2); and the checks of what a flag means once its command knows
more (a softmax cut against the tokens in play, multi-process flags that only go together)."""

from __future__ import annotations

import argparse
import math
from typing import Iterable, Optional

from elm_jax.errors import UserInputError


class FlagError(UserInputError):
  """A flag whose value has the right type but makes no sense with the rest of the run."""


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
  group.add_argument("--initialization_timeout", type=positive_int, default=300,
                     help="seconds to wait for the coordinator and every process to join before "
                          "ending with an error (default 300)")


def distributed_flags_given(args: argparse.Namespace) -> bool:
  """Whether any multi-process flag was given (`partitioning.initialize_distributed` then checks
  that they make sense together: one given alone is refused, not ignored)."""
  return (getattr(args, "distributed_auto", False) is True
          or any(getattr(args, name, None) is not None
                 for name in ("coordinator_address", "num_processes", "process_id")))


# `elm-jax plan` simulates a pod as fake XLA:CPU devices of its own process. XLA:CPU (jaxlib
# 0.10.2) compiles a program for at most 2048 devices in one process: past that, compilation
# fails with "Multiprocess computations aren't implemented on the CPU backend", and every fake
# device costs host memory and start-up time (100,000 grew past 3 GB without answering). 2048
# covers every GPU host and TPU slice up to a v4-4096 / v5p-4096 (2048 chips); a larger pod's
# per-device figures are those of a slice with the same expert and model axes and a smaller
# data axis.
MAX_PLAN_DEVICES = 2048


def plan_devices(text: str) -> int:
  """A device count `elm-jax plan` can simulate: 1 .. MAX_PLAN_DEVICES."""
  expected = (f"1 .. {MAX_PLAN_DEVICES} (XLA:CPU compiles for at most {MAX_PLAN_DEVICES} devices in one "
              "process; plan a larger pod as a slice with the same expert and model axes)")
  value = _integer(text, 1, expected)
  if value > MAX_PLAN_DEVICES:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
  return value


def check_softmax_cut(cut: Optional[int], vocabulary, choices: Iterable[tuple[str, str]] = (),
                      eos_id: int = 1, pad_id: int = 0) -> None:
  """Refuses a `--softmax_vocab_size` below a token that scoring needs, before any scoring:
  EOS and padding (which every target carries), any token of `choices` ((where, text) pairs:
  the answer choices about to be scored), or any piece of `vocabulary` (a SentencePiece model,
  whose tokens the model could then never score or predict). None: no cut."""
  if cut is None:
    return
  size = vocabulary.vocab_size
  if cut >= size:  # every token id, EOS and padding included, is below the vocabulary's size
    return
  for where, text in choices:
    top = max(vocabulary.encode(text), default=-1)
    if top >= cut:
      raise FlagError(f"--softmax_vocab_size={cut}: below token id {top} of choice {text!r} ({where}); "
                      f"expected at least {size}, the vocabulary's size ({vocabulary.path})")
  for name, token in (("EOS", eos_id), ("padding", pad_id)):
    if token >= cut:
      raise FlagError(f"--softmax_vocab_size={cut}: below the {name} token id {token}; expected at least "
                      f"{size}, the vocabulary's size ({vocabulary.path})")
  if cut < size:
    raise FlagError(f"--softmax_vocab_size={cut}: below the vocabulary's {size} tokens ({vocabulary.path}): "
                    f"tokens {cut}..{size - 1} could never be scored or predicted; expected at least {size}")
