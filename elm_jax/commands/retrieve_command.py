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
from typing import Optional

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
  method = selection.selection_method(args.method)
  queries = instances.query_instances(args.task, args.num_queries, args.split, labelled=method.labelled)
  chosen = select(args.library, queries, method=args.method, experts=args.experts, embedder=args.embedder,
                  text_format=args.text_format, criterion=args.criterion, checkpoint=args.checkpoint,
                  batch_size=args.batch_size, expert_chunk=args.expert_chunk,
                  mesh_config=run_files.mesh_config(args.mesh), check_integrity=not args.skip_integrity_check,
                  model_config=gin_utils.model_config_or_none(), source=f"task {args.task}")
  return {"task": args.task, "method": args.method, "embedder": chosen.computed_from.get("embedder"),
          "text_format": args.text_format, "criterion": chosen.computed_from.get("criterion"),
          "queries": len(queries), "split": args.split, "ranking": chosen.ranking()}


def select(library_dir: str, queries, *, method: str = "roe", experts="all", embedder="minilm",
           text_format: str = instances.DEFAULT_TEXT_FORMAT, criterion: str = "entropy",
           checkpoint: Optional[str] = None, batch_size: int = defaults.BATCH_SIZE,
           expert_chunk: Optional[int] = None, mesh_config: Optional[partitioning.MeshConfig] = None,
           check_integrity: bool = True, model_config=None, source: str = "queries") -> selection.Selection:
  """The library's `experts` ('all' or names) ranked by `method` for the task `queries` come
  from (`selection.select_experts`): RoE reads the library's keys only; a method that reads
  scores loads the experts on their backbone and scores the queries on the mesh and expert
  chunk `run_files.choose_placement` picks. What `retrieve` and `elm_jax.api.select_experts`
  run."""
  library = ExpertLibrary(library_dir, check_integrity=check_integrity)
  names = library.resolve(experts)
  options = dict(queries=queries, embedder=embedder, text_format=text_format, criterion=criterion,
                 checkpoint=checkpoint, model_config=model_config, source=source)
  if selection.selection_method(method).reads == "keys":  # only the library's keys: no backbone is loaded
    return selection.select_experts(method, library, names=None if experts == "all" else names, **options)
  loaded = load_experts(library_dir, names, checkpoint=checkpoint, check_integrity=check_integrity,
                        config=model_config)
  placed = run_files.choose_placement(loaded, "retrieve", batch_size=batch_size, expert_chunk=expert_chunk,
                                      mesh_config=mesh_config, max_input_length=defaults.MAX_INPUT_LENGTH,
                                      max_target_length=defaults.MAX_TARGET_LENGTH)
  return selection.select_experts(method, loaded, **options, scoring=dict(
      batch_size=batch_size, partitioner=placed.partitioner, expert_chunk=placed.expert_chunk))


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
