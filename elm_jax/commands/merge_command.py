"""`elm-jax merge`: merge library experts into a new one, saved to the library with its provenance.

    elm-jax merge --library=LIB --experts=a,b,c --name=abc_mean                  # the paper's mean
    elm-jax merge --library=LIB --ranking=ranking.json --top_k=3 --name=top3     # from `retrieve`
    elm-jax merge --library=LIB --experts=a,b --method=ties --density=0.2 --name=ab_ties
"""

from __future__ import annotations

import argparse
import json

from elm_jax import files, partitioning
from elm_jax.commands import flags, gin_utils
from elm_jax.errors import UserInputError
from elm_jax.library.merge_and_add import METHODS, merge_into_library
from elm_jax.library.store import ExpertLibrary, safe_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--library", required=True)
  parser.add_argument("--name", required=True, help="library name of the merged expert")
  parser.add_argument("--experts", default=None, help="NAME,NAME,... to merge")
  parser.add_argument("--ranking", default=None, help="JSON written by `elm-jax retrieve --output`")
  parser.add_argument("--top_k", type=flags.positive_int, default=None,
                      help="with --ranking: merge the first K")
  parser.add_argument("--method", choices=METHODS, default="uniform")
  parser.add_argument("--weights", default=None, help="weighted: W,W,... (one per expert)")
  parser.add_argument("--scale", type=flags.finite_float, default=1.0, help="task_arithmetic / ties: lambda")
  parser.add_argument("--density", type=flags.fraction, default=0.2, help="ties: fraction of entries kept")
  parser.add_argument("--checkpoint", default=None,
                      help="task_arithmetic / ties: the backbone (default: the library's), for the base values")
  flags.add_integrity_flag(parser)


def selected_experts(args: argparse.Namespace, library: ExpertLibrary) -> list[str]:
  if bool(args.experts) == bool(args.ranking):
    raise UserInputError("pass exactly one of --experts=NAME,... and --ranking=FILE")
  if args.experts:
    return library.resolve(args.experts)
  files.check_input_file(args.ranking, "--ranking")
  try:
    with open(args.ranking, encoding="utf-8") as f:
      ranking = json.load(f)["ranking"]
    names = [entry["expert"] for entry in ranking]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserInputError(f"{args.ranking}: expected the JSON of `elm-jax retrieve --output` with a "
                         f"'ranking' list of {{expert, ...}} ({type(e).__name__}: {e})") from None
  if args.top_k is None:
    raise UserInputError("--ranking needs --top_k=K (a positive integer)")
  return library.resolve(names[:args.top_k])


def main(args: argparse.Namespace) -> int:
  library = ExpertLibrary(args.library, check_integrity=not args.skip_integrity_check)
  safe_name(args.name)  # a usable name, checked before any work
  names = selected_experts(args, library)
  weights = None
  if args.weights:
    try:
      weights = [flags.finite_float(w) for w in args.weights.split(",")]
    except argparse.ArgumentTypeError as e:
      raise UserInputError(f"--weights={args.weights}: {e}; expected numbers separated by commas") from None
  elif args.method == "weighted":
    raise UserInputError("--method=weighted needs --weights=W,W,...")
  if partitioning.is_primary():  # the library has one writer; the other processes wait for it
    merge_into_library(library, names, args.name, args.method, weights=weights, scale=args.scale,
                       density=args.density, checkpoint=args.checkpoint, config=gin_utils.model_config_or_none())
  partitioning.barrier("elm_jax.merge")
  print(f"merged {len(names)} expert(s) ({args.method}) into {args.name}: {', '.join(names)}")
  return 0
