"""`elm-jax route`: a library's experts routed on a task's examples, mixed per token or per
example in one pass, and the accuracy of the mixture (or, on a task without answer choices, its
decoded texts and their ROUGE/BLEU).

    elm-jax route --library=LIB --task=builtin_nli_can_we_infer_score_eval --method=arrow --top_k=2

Methods (`library/routing_methods.py`): `uniform` (every expert's output, weight 1/E), `arrow`
(per token and module, top-k experts by their prototypes), `phatgoose` (per token and module,
top-k experts by their trained gates; `elm-jax train-gates` first), `retrieval` (per example: its
nearest retrieval keys vote; --embedder, --neighbours), `forced` (every example to --expert).
Prints the accuracy or the generation metrics (or, without labels, the number of examples
routed); --output writes the result, with every example's prediction, as JSON. `elm-jax eval
--routing=METHOD` runs the same methods as columns of the resumable sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from elm_jax import defaults, files, partitioning
from elm_jax.commands import flags, gin_utils, run_files
from elm_jax.evaluation import expert_eval
from elm_jax.library import retrieval, routing_methods
from elm_jax.library.loaded import load_experts
from tasks import instances

REQUIRED = ("library", "task")  # flags a run file may bind instead (runs/route.gin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--library", default=None, help="Expert Library (or LIBRARY in a run file)")
  parser.add_argument("--task", default=None, help="task whose examples are routed (registered SeqIO task)")
  parser.add_argument("--method", choices=tuple(routing_methods.METHODS), default="arrow",
                      help="; ".join(f"{m.name}: {m.description}" for m in routing_methods.METHODS.values()))
  add_routing_options(parser)
  parser.add_argument("--experts", default="all", help="experts routed: all or NAME,NAME,...")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--max_examples", type=flags.positive_int, default=defaults.MAX_EXAMPLES)
  parser.add_argument("--checkpoint", default=None, help="backbone (default: the one the library records)")
  parser.add_argument("--batch_size", type=flags.positive_int, default=defaults.BATCH_SIZE)
  parser.add_argument("--max_input_length", type=flags.positive_int, default=defaults.MAX_INPUT_LENGTH)
  parser.add_argument("--max_target_length", type=flags.positive_int, default=defaults.MAX_TARGET_LENGTH,
                      help="choice length for rank classification; decode length for generation")
  parser.add_argument("--beam_size", type=flags.positive_int, default=1, help="generation: 1 = greedy decoding")
  parser.add_argument("--mesh", default=None, help="data:D,expert:E,model:M (default: every device)")
  parser.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  parser.add_argument("--output", default=None, help="JSON file for the result and every prediction")
  flags.add_integrity_flag(parser)


ROUTING_OPTIONS = tuple(routing_methods.OPTION_DEFAULTS)


def add_routing_options(parser: argparse.ArgumentParser) -> None:
  """The flags each routing method reads (`ROUTING_OPTIONS`; `route` and `eval --routing`)."""
  parser.add_argument("--top_k", type=flags.positive_int, default=1,
                      help="experts kept per token (arrow, phatgoose) or per example (retrieval)")
  parser.add_argument("--temperature", type=float, default=1.0, help="arrow, phatgoose: softmax temperature over the top k")
  parser.add_argument("--expert", default=None, help="forced: the expert every example is routed to")
  parser.add_argument("--embedder", choices=retrieval.EMBEDDERS, default="minilm", help="retrieval: key embedder")
  parser.add_argument("--text_format", choices=instances.TEXT_FORMATS, default=instances.DEFAULT_TEXT_FORMAT)
  parser.add_argument("--neighbours", type=flags.positive_int, default=routing_methods.NEIGHBOURS,
                      help="retrieval: nearest keys that vote for each example")


def route_task(library_dir: str, task: str, *, method: str = "arrow", experts: str | Sequence[str] = "all",
               top_k: int = 1, temperature: float = 1.0, expert: Optional[str] = None, embedder="minilm",
               text_format: str = instances.DEFAULT_TEXT_FORMAT, neighbours: int = routing_methods.NEIGHBOURS,
               split: str = "validation", max_examples: Optional[int] = defaults.MAX_EXAMPLES,
               checkpoint: Optional[str] = None, batch_size: int = defaults.BATCH_SIZE,
               max_input_length: int = defaults.MAX_INPUT_LENGTH,
               max_target_length: int = defaults.MAX_TARGET_LENGTH,
               mesh_config: Optional[partitioning.MeshConfig] = None, check_integrity: bool = True,
               model_config=None, setup: Optional[str] = None, beam_size: int = 1) -> routing_methods.RoutedResult:
  """The library's `experts` routed by `method` on up to `max_examples` examples of `task`'s
  `split` (rank classification, or decoding where there are no answer choices), on the mesh
  `run_files.choose_placement` picks (experts on its `expert` axis): `routing_methods.route`.
  What `route` and `elm_jax.api.route` run."""
  instances.register_setup(setup)
  instances.ensure_registered([task])
  rows = expert_eval.read_task_rows(task, split, max_examples)
  loaded = load_experts(library_dir, experts, checkpoint=checkpoint, check_integrity=check_integrity,
                        config=model_config)
  placed = run_files.choose_placement(loaded, "route", batch_size=batch_size, expert_chunk=None,
                                      mesh_config=mesh_config, max_input_length=max_input_length,
                                      max_target_length=max_target_length)
  return routing_methods.route(loaded, rows, method, top_k=top_k, temperature=temperature, expert=expert,
                               embedder=embedder, text_format=text_format, neighbours=neighbours,
                               batch_size=batch_size, partitioner=placed.partitioner,
                               max_input_length=max_input_length, max_target_length=max_target_length,
                               beam_size=beam_size, source=f"task {task}")


def result_record(task: str, result: routing_methods.RoutedResult) -> dict:
  """The JSON `--output` holds: the method, what it read, the accuracy, the metrics and each
  prediction (a choice index, or a decoded text)."""
  predictions = [int(p) for p in result.predictions] if result.ranked else list(result.predictions)
  return {"task": task, "method": result.method, "experts": list(result.experts), "accuracy": result.accuracy,
          "metrics": result.metrics, "computed_from": result.computed_from, "predictions": predictions}


def main(args: argparse.Namespace) -> int:
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  run_files.fill_from_gin(args, run_files.parser_defaults(parser), required=REQUIRED)
  if args.output:
    files.check_output_file(args.output, "--output", within=files.directories_read(args.library, args.checkpoint))
  result = route_task(args.library, args.task, method=args.method, experts=args.experts, top_k=args.top_k,
                      temperature=args.temperature, expert=args.expert, embedder=args.embedder,
                      text_format=args.text_format, neighbours=args.neighbours, split=args.split,
                      max_examples=args.max_examples, checkpoint=args.checkpoint, batch_size=args.batch_size,
                      max_input_length=args.max_input_length, max_target_length=args.max_target_length,
                      mesh_config=run_files.mesh_config(args.mesh), check_integrity=not args.skip_integrity_check,
                      model_config=gin_utils.model_config_or_none(), setup=args.setup, beam_size=args.beam_size)
  what = (", ".join(f"{k} {v:.2f}" + ("%" if k == "accuracy" else "") for k, v in result.metrics.items())
          or "no labels")
  print(f"{args.task}\t{args.method}\t{len(result.predictions)} examples\t{what}")
  if args.output:
    if partitioning.is_primary():
      files.write_output(args.output, json.dumps(result_record(args.task, result), indent=1).encode())
    partitioning.barrier("elm_jax.route.output")
    print(f"wrote the routed predictions to {args.output}", file=sys.stderr)
  return 0
