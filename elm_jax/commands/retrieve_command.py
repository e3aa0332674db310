"""`elm-jax retrieve`: rank a library's experts for an unseen task.

    elm-jax retrieve --library=LIB --task=builtin_nli_can_we_infer_score_eval --method=roe --top_k=3

`roe` (default): 32 unlabeled inputs vote with their top-1 training-instance neighbours
(--embedder minilm, the paper's; t5, the backbone's encoder; or bm25). `likelihood`: every expert
scores the inputs' answer choices in one pass, ranked by --criterion. `oracle`: ranked by
accuracy on the labelled inputs (analysis only). The methods are `library/selection.py`'s.
"""

from __future__ import annotations

import argparse
import json
import sys

from elm_jax import defaults, files, partitioning
from elm_jax.commands import flags, gin_utils, run_files
from elm_jax.library import retrieval, selection
from elm_jax.library.loaded import load_experts
from elm_jax.library.store import ExpertLibrary
from tasks import instances

REQUIRED = ("library", "task")  # flags a run file may bind instead (runs/retrieve.gin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--library", default=None, help="Expert Library (or LIBRARY in a run file)")
  parser.add_argument("--task", default=None, help="target task (registered SeqIO task)")
  parser.add_argument("--method", choices=tuple(selection.METHODS), default="roe",
                      help="; ".join(f"{m.name}: {m.description}" for m in selection.METHODS.values()))
  parser.add_argument("--top_k", type=flags.positive_int, default=1, help="experts to report (ranked)")
  parser.add_argument("--experts", default="all", help="candidates: all or NAME,NAME,...")
  parser.add_argument("--embedder", choices=retrieval.EMBEDDERS, default="minilm")
  parser.add_argument("--text_format", choices=instances.TEXT_FORMATS, default=instances.DEFAULT_TEXT_FORMAT)
  parser.add_argument("--criterion", choices=selection.CRITERIA, default="entropy",
                      help="likelihood method: lowest mean entropy or highest mean max-probability")
  parser.add_argument("--num_queries", type=flags.positive_int, default=instances.NUM_QUERIES)
  parser.add_argument("--split", default="validation", help="split of the target task the queries come from")
  parser.add_argument("--checkpoint", default=None, help="backbone (default: the one the library records)")
  parser.add_argument("--batch_size", type=flags.positive_int, default=defaults.BATCH_SIZE)
  parser.add_argument("--expert_chunk", type=flags.positive_int, default=None,
                      help="experts scored per pass (default: from the devices' memory)")
  parser.add_argument("--mesh", default=None,
                      help="likelihood/oracle: data:D,expert:E,model:M (default: every device)")
  parser.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  parser.add_argument("--output", default=None, help="JSON file for the full ranking")
  flags.add_integrity_flag(parser)


def rank(args: argparse.Namespace) -> dict:
  instances.register_setup(args.setup)
  instances.ensure_registered([args.task])
  library = ExpertLibrary(args.library, check_integrity=not args.skip_integrity_check)
  names = library.resolve(args.experts)
  method = selection.selection_method(args.method)
  queries = instances.query_instances(args.task, args.num_queries, args.split, labelled=method.labelled)
  config = gin_utils.model_config_or_none()
  options = dict(queries=queries, embedder=args.embedder, text_format=args.text_format, criterion=args.criterion,
                 checkpoint=args.checkpoint, model_config=config, source=f"task {args.task}")
  if method.reads == "keys":  # only the library's keys: no backbone is loaded
    chosen = selection.select_experts(args.method, library, names=None if args.experts == "all" else names,
                                      **options)
  else:
    loaded = load_experts(args.library, names, checkpoint=args.checkpoint,
                          check_integrity=not args.skip_integrity_check, config=config)
    placed = run_files.placement_for(loaded, args, "retrieve", max_input_length=defaults.MAX_INPUT_LENGTH,
                                     max_target_length=defaults.MAX_TARGET_LENGTH)
    chosen = selection.select_experts(args.method, loaded, **options, scoring=dict(
        batch_size=args.batch_size, partitioner=placed.partitioner, expert_chunk=placed.expert_chunk))
  return {"task": args.task, "method": args.method, "embedder": chosen.computed_from.get("embedder"),
          "text_format": args.text_format, "criterion": chosen.computed_from.get("criterion"),
          "queries": len(queries), "split": args.split, "ranking": chosen.ranking()}


def main(args: argparse.Namespace) -> int:
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  run_files.fill_from_gin(args, run_files.parser_defaults(parser), required=REQUIRED)
  if args.output:
    files.check_output_file(args.output, "--output",
                            within=files.directories_read(args.library, args.checkpoint))
  result = rank(args)
  for i, entry in enumerate(result["ranking"][:args.top_k]):
    detail = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in entry.items() if k != "expert")
    print(f"{i + 1}\t{entry['expert']}\t{detail}")
  if args.output:
    if partitioning.is_primary():
      files.write_output(args.output, json.dumps(result, indent=1, allow_nan=False).encode())
    partitioning.barrier("elm_jax.retrieve.output")
    print(f"wrote the ranking of {len(result['ranking'])} experts to {args.output}", file=sys.stderr)
  return 0
