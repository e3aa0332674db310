"""`elm-jax eval`: every selected library expert on every prompt of a task or mixture, as a
sweep that resumes and splits over jobs (`evaluation/sweep.py`), on every device.

    elm-jax eval --library=LIB --experts=all --task=builtin_held_out --output_dir=/tmp/eval

Writes results.json, results.csv, results.md (per prompt, then mean and median over each
dataset's prompts) and predictions/<task>.jsonl (every expert's prediction per example), built
from the sweep's units in units/ (a rerun skips finished units), with log.jsonl and TensorBoard
scalars beside them. `--shard=i/N` computes one job's share of the units; `--assemble` writes
the reports once every shard is done. The mesh is `--mesh`, gin's `partitioning.MeshConfig`, or
every device (the command prints the layout it chose; `evaluation/placement.py`).

`--routing=arrow,uniform` evaluates the selected experts routed together by each method
(`library/routing_methods.py`, options as `elm-jax route`'s: --top_k, --temperature, --expert,
--embedder, --text_format, --neighbours) instead of each expert alone: one column a method,
`routed:METHOD`, rank-classified or decoded like an expert's, in the same resumable sweep (a
routed column is recomputed when its method, options, experts, gates or keys change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any, Optional, Sequence

from elm_jax import defaults, files, partitioning
from elm_jax.commands import flags, gin_utils, route_command, run_files
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval, sweep
from elm_jax.library import routing_methods
from elm_jax.library.loaded import load_experts
from tasks import instances

# The flags that make up a run's record in results.json (not those that only say how or where
# it ran: a sharded, resumed or re-meshed sweep writes the same report).
RECORDED_FLAGS = ("library", "task", "split", "max_examples", "softmax_vocab_size", "batch_size",
                  "max_input_length", "max_target_length", "beam_size", "checkpoint", "setup")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--library", default=None, help="Expert Library (or LIBRARY in a run file)")
  parser.add_argument("--experts", default="all", help="all or NAME,NAME,...")
  parser.add_argument("--task", default=None, help="registered SeqIO task or mixture")
  parser.add_argument("--output_dir", default=None,
                      help="reports and the sweep's units; rerunning the same command there resumes")
  parser.add_argument("--overwrite", action="store_true",
                      help="recompute every unit instead of resuming (only eval's own files are replaced)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--max_examples", type=flags.positive_int_or_all, default=defaults.MAX_EXAMPLES,
                      help="per task, or 'all' (the paper evaluates full validation splits)")
  parser.add_argument("--softmax_vocab_size", type=flags.positive_int, default=None,
                      help="log-softmax over the first N logits (the paper: 32100); default: what the "
                           "experts were trained with")
  parser.add_argument("--batch_size", type=flags.positive_int, default=defaults.BATCH_SIZE)
  parser.add_argument("--expert_chunk", type=flags.positive_int, default=None,
                      help="experts per device pass (default: from the devices' memory)")
  parser.add_argument("--mesh", default=None,
                      help="data:D,expert:E,model:M (default: every device, experts on `expert`)")
  parser.add_argument("--unit_experts", type=flags.positive_int, default=None,
                      help="experts per sweep unit (default: all, one unit per task)")
  parser.add_argument("--shard", default=None,
                      help="i/N: compute only this job's share of the units (no report; see --assemble)")
  parser.add_argument("--assemble", action="store_true",
                      help="compute nothing: write the reports from the units of every shard")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--max_input_length", type=flags.token_length, default=defaults.MAX_INPUT_LENGTH)
  parser.add_argument("--max_target_length", type=flags.token_length, default=defaults.MAX_TARGET_LENGTH,
                      help="choice length for rank classification; decode length for generation")
  parser.add_argument("--beam_size", type=flags.positive_int, default=1, help="1 = greedy decoding")
  parser.add_argument("--checkpoint", default=None, help="backbone (default: the one the library records)")
  parser.add_argument("--force", action="store_true", help="load experts trained on another backbone")
  parser.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  parser.add_argument("--routing", type=_methods, default=None,
                      help="METHOD[,METHOD]: the experts routed together by each method ("
                           + ", ".join(routing_methods.METHODS) + "), one column each, instead of each alone")
  route_command.add_routing_options(parser)
  flags.add_integrity_flag(parser)


def _methods(text: str) -> tuple[str, ...]:
  """--routing's value: known method names, comma-separated."""
  methods = tuple(m.strip() for m in text.split(",") if m.strip())
  unknown = [m for m in methods if m not in routing_methods.METHODS]
  if unknown or not methods:
    raise argparse.ArgumentTypeError(f"expected method names among {', '.join(routing_methods.METHODS)}, "
                                     f"comma-separated; got {text!r}")
  return methods


def main(args: argparse.Namespace) -> int:
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  run_files.fill_from_gin(args, run_files.parser_defaults(parser), required=("library", "task", "output_dir"))
  if args.shard is not None and args.assemble:
    raise UserInputError("--shard and --assemble: a shard computes its units; --assemble (without "
                         "--shard) writes the reports once every shard is done")
  start = time.perf_counter()
  options = {name: getattr(args, name) for name in RECORDED_FLAGS + (
      "experts", "expert_chunk", "unit_experts", "assemble", "overwrite", "force")}
  routing = args.routing
  if isinstance(routing, str):  # the ROUTING macro of a run file: 'arrow,uniform'
    try:
      routing = _methods(routing)
    except argparse.ArgumentTypeError as e:
      raise UserInputError(f"--gin.ROUTING={routing!r}: {e}") from None
  options.update(routing=routing, routing_options={k: getattr(args, k) for k in route_command.ROUTING_OPTIONS})
  options.update(library_dir=options.pop("library"), shard=sweep.parse_shard(args.shard),
                 mesh_config=run_files.mesh_config(args.mesh), progress=not args.no_progress,
                 check_integrity=not args.skip_integrity_check, model_config=gin_utils.model_config_or_none())
  names, tasks, results = run_sweep(args.output_dir, **options)
  if results is None:
    print(f"shard {args.shard}: its units are in {args.output_dir}/units ({time.perf_counter() - start:.1f}s); "
          "when every shard is done: the same command with --assemble instead of --shard", file=sys.stderr)
    return 0
  for result in results:
    best = max(names, key=lambda e: result.metrics[e][result.primary])
    print(f"{result.task}: {result.examples} examples, best {best} "
          f"{result.primary}={result.metrics[best][result.primary]:.1f}", file=sys.stderr)
  print(expert_eval.markdown_table(results, names))
  print(f"evaluated {len(names)} expert(s) on {len(tasks)} task(s) in "
        f"{time.perf_counter() - start:.1f}s -> {args.output_dir}", file=sys.stderr)
  return 0


def run_sweep(output_dir: str, *, library_dir: str, task: str, experts="all", split: str = "validation",
              max_examples: Optional[int] = defaults.MAX_EXAMPLES, softmax_vocab_size: Optional[int] = None,
              batch_size: int = defaults.BATCH_SIZE, expert_chunk: Optional[int] = None,
              mesh_config: Optional[partitioning.MeshConfig] = None, unit_experts: Optional[int] = None,
              shard: Optional[tuple[int, int]] = None, assemble: bool = False, overwrite: bool = False,
              progress: bool = True, max_input_length: int = defaults.MAX_INPUT_LENGTH,
              max_target_length: int = defaults.MAX_TARGET_LENGTH, beam_size: int = 1,
              checkpoint: Optional[str] = None, force: bool = False, setup: Optional[str] = None,
              check_integrity: bool = True, model_config=None, routing: Optional[Sequence[str]] = None,
              routing_options: Optional[dict[str, Any]] = None):
  """Every selected expert of the library on every task of `task` (a task or mixture), as the
  resumable sweep of `evaluation/sweep.py` into `output_dir`, whose reports (results.json, .csv,
  .md, predictions/) process 0 writes once the sweep is whole. Returns (the experts' names, the
  member tasks, each task's TaskResult; None for a shard). With `routing` (method names), the
  columns are those methods routing the selected experts together (`routing_options`: `route`'s
  options by name), not the experts alone. What `eval` and `elm_jax.api.evaluate(...,
  output_dir=...)` run; the arguments are `eval`'s flags."""
  files.check_output_dir(output_dir, "--output_dir", within=files.directories_read(library_dir, checkpoint))
  expert_eval.check_output_dir(output_dir)
  instances.register_setup(setup)
  instances.ensure_registered([task])
  tasks = expert_eval.member_tasks(task)
  loaded = load_experts(library_dir, experts, checkpoint=checkpoint, force=force, check_integrity=check_integrity,
                        config=model_config, softmax_vocab_size=softmax_vocab_size)
  flags.check_softmax_cut(softmax_vocab_size, loaded.vocabulary(), eos_id=loaded.config.eos_id,
                          pad_id=loaded.config.pad_id)
  chosen = run_files.choose_placement(loaded, "eval", batch_size=batch_size, expert_chunk=expert_chunk,
                                      mesh_config=mesh_config, max_input_length=max_input_length,
                                      max_target_length=max_target_length)
  options = sweep.SweepOptions(split=split, max_examples=max_examples, batch_size=batch_size,
                               max_input_length=max_input_length, max_target_length=max_target_length,
                               beam_size=beam_size, softmax_vocab_size=loaded.config.softmax_vocab_size)
  digests = {name: sweep.expert_digest(loaded.library.entry(name)["files"]) for name in loaded.names}
  routed = routed_columns(loaded, routing or (), routing_options or {}, partitioner=chosen.partitioner,
                          batch_size=batch_size, max_input_length=max_input_length,
                          max_target_length=max_target_length, beam_size=beam_size)
  results = sweep.run_sweep(loaded, tasks, output_dir, options=options, expert_digests={} if routed else digests,
                            backbone_fingerprint=loaded.fingerprint, partitioner=chosen.partitioner,
                            expert_chunk=chosen.expert_chunk, unit_experts=unit_experts, shard=shard,
                            assemble=assemble, recompute=overwrite, progress=progress, routed=routed)
  columns = [c.name for c in routed] if routed else list(loaded.names)
  if results is not None:
    run = {"library": library_dir, "task": task, "split": split, "max_examples": max_examples,
           "softmax_vocab_size": softmax_vocab_size, "batch_size": batch_size,
           "max_input_length": max_input_length, "max_target_length": max_target_length,
           "beam_size": beam_size, "checkpoint": checkpoint, "setup": setup, "experts": list(loaded.names)}
    if routed:
      run["routing"] = {"methods": list(routing), **routing_methods.OPTION_DEFAULTS, **(routing_options or {})}
    if partitioning.is_primary():  # every process holds every result; one writes them
      expert_eval.write_reports(output_dir, results, columns, run)
    partitioning.barrier("elm_jax.eval.reports")
  return columns, tasks, results


def routed_columns(loaded, methods: Sequence[str], options: dict[str, Any], *, partitioner, batch_size: int,
                   max_input_length: int, max_target_length: int, beam_size: int) -> list[sweep.RoutedColumn]:
  """The sweep's column for each routing method: the loaded experts routed together with
  `options` (`route`'s, by name). Its digest covers the method, the options and, per expert,
  its files, gates and retrieval keys as the manifest records them."""
  unknown = set(options) - set(routing_methods.OPTION_DEFAULTS)
  if unknown:
    raise UserInputError(f"routing options: unknown {sorted(unknown)}; expected some of "
                         f"{list(routing_methods.OPTION_DEFAULTS)}")
  options = {**routing_methods.OPTION_DEFAULTS, **options}
  records = {name: {key: loaded.library.entry(name).get(key) for key in ("files", "gates_file", "keys_file")}
             for name in loaded.names}
  columns = []
  for method in methods:
    routing_methods.routing_method(method)  # an unknown name is refused before any work
    depends = {"method": method, "options": options, "experts": records}
    digest = hashlib.sha256(json.dumps(depends, sort_keys=True, default=str).encode()).hexdigest()

    def evaluate(experts, task, rows, method=method):
      return routing_methods.routed_task_result(
          experts, task, rows, method, partitioner=partitioner, batch_size=batch_size,
          max_input_length=max_input_length, max_target_length=max_target_length, beam_size=beam_size, **options)
    columns.append(sweep.RoutedColumn(routing_methods.column_name(method), digest, evaluate))
  return columns
