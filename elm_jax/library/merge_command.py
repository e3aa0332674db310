"""`elm-jax merge`: merge library experts into a new one, saved to the library with its provenance.

    elm-jax merge --library=LIB --experts=a,b,c --name=abc_mean                  # the paper's mean
    elm-jax merge --library=LIB --ranking=ranking.json --top_k=3 --name=top3     # from `retrieve`
    elm-jax merge --library=LIB --experts=a,b --method=ties --density=0.2 --name=ab_ties
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

from elm_jax import flags
from elm_jax.errors import UserInputError
from elm_jax.library import expert_files, merging
from elm_jax.library.store import ExpertLibrary, LibraryError, safe_name

METHODS = ("uniform", "weighted", "task_arithmetic", "ties", "lora_updates", "lora_factors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
  from elm_jax import files
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


def merge(library: ExpertLibrary, names: list[str], method: str, *, weights=None, scale: float = 1.0,
          density: float = 0.2, checkpoint=None):
  """(merged tree, its ExpertConfig as a dict, the first expert's metadata)."""
  trees, metas = zip(*(library.load(n) for n in names))
  config = dict(metas[0].expert_config)
  for name, meta in zip(names, metas):
    if meta.expert_config != config:
      raise UserInputError(f"{library.expert_dir(name)}: expert {name!r} has expert_config "
                           f"{meta.expert_config}, unlike {names[0]!r}; only like experts merge")
  if method == "uniform":
    return merging.merge_uniform(trees), config, metas[0]
  if method == "weighted":
    return merging.merge_weighted(trees, weights), config, metas[0]
  if method in ("lora_updates", "lora_factors"):
    if config.get("kind") != "lora":
      raise UserInputError(f"--method={method}: the experts are {config.get('kind')!r} experts, not LoRA")
    if method == "lora_factors":
      return merging.merge_lora_factors(trees, weights), config, metas[0]
    tree, changes = merging.merge_lora_updates(trees, weights)
    return tree, {**config, **changes}, metas[0]
  from elm_jax.library.loaded import load_backbone
  pretrained = load_backbone(library, checkpoint)[0].params
  base = merging.zero_base(trees[0], pretrained)
  if method == "task_arithmetic":
    return merging.task_arithmetic(trees, base, scale), config, metas[0]
  return merging.merge_ties(trees, base, density, scale), config, metas[0]


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
  provenance = {"merged_from": names, "method": args.method, "weights": weights,
                "scale": args.scale if args.method in ("task_arithmetic", "ties") else None,
                "density": args.density if args.method == "ties" else None}
  if args.name in library.names() and library.entry(args.name).get("provenance") != provenance:
    # The same merge again (a rerun after an interruption) goes on: adding identical files is a
    # no-op. Another merge under this name is refused before any work.
    raise LibraryError(f"--name={args.name}: the library already holds an expert of that name (not "
                       "this merge); experts are never replaced: choose another --name")
  tree, config, first = merge(library, names, args.method, weights=weights, scale=args.scale,
                              density=args.density, checkpoint=args.checkpoint)
  meta = dataclasses.replace(first, name=args.name, task="merge:" + ",".join(names), prompt=None,
                             expert_config=config, steps=0, metrics={},
                             training_config={**first.training_config, "merge": provenance})
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, "merged")
    expert_files.save_expert(directory, tree, meta)
    # No retrieval keys: a merge is chosen by its recipe, and copies of its members' keys would
    # split their votes.
    library.add(directory, name=args.name, provenance=provenance)
  print(f"merged {len(names)} expert(s) ({args.method}) into {args.name}: {', '.join(names)}")
  return 0
