"""`elm-jax eval`: every selected library expert on every prompt of a task or mixture.

    elm-jax eval --library=LIB --experts=all --task=builtin_held_out --output_dir=/tmp/eval

Writes results.json, results.csv, results.md (per prompt, then mean and median over each
dataset's prompts) and predictions/<task>.jsonl (every expert's prediction per example).
"""

from __future__ import annotations

import argparse
import sys
import time

from elm_jax import defaults, partitioning
from elm_jax.commands import flags, gin_utils
from elm_jax.evaluation import expert_eval
from elm_jax.library.loaded import load_experts
from tasks import instances


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--library", required=True)
  parser.add_argument("--experts", default="all", help="all or NAME,NAME,...")
  parser.add_argument("--task", required=True, help="registered SeqIO task or mixture")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--max_examples", type=flags.positive_int_or_all, default=defaults.MAX_EXAMPLES,
                      help="per task, or 'all' (the paper evaluates full validation splits)")
  parser.add_argument("--softmax_vocab_size", type=flags.positive_int, default=None,
                      help="log-softmax over the first N logits (the paper: 32100); default: what the "
                           "experts were trained with")
  parser.add_argument("--batch_size", type=flags.positive_int, default=defaults.BATCH_SIZE)
  parser.add_argument("--expert_chunk", type=flags.positive_int, default=None,
                      help="experts per device pass (memory)")
  parser.add_argument("--max_input_length", type=flags.token_length, default=defaults.MAX_INPUT_LENGTH)
  parser.add_argument("--max_target_length", type=flags.token_length, default=defaults.MAX_TARGET_LENGTH,
                      help="choice length for rank classification; decode length for generation")
  parser.add_argument("--beam_size", type=flags.positive_int, default=1, help="1 = greedy decoding")
  parser.add_argument("--checkpoint", default=None, help="backbone (default: the one the library records)")
  parser.add_argument("--force", action="store_true", help="load experts trained on another backbone")
  parser.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  flags.add_integrity_flag(parser)


def main(args: argparse.Namespace) -> int:
  expert_eval.check_output_dir(args.output_dir, args.overwrite)
  instances.register_setup(args.setup)
  instances.ensure_registered([args.task])
  tasks = expert_eval.member_tasks(args.task)
  loaded = load_experts(args.library, args.experts, checkpoint=args.checkpoint, force=args.force,
                        check_integrity=not args.skip_integrity_check,
                        config=gin_utils.model_config_or_none(), softmax_vocab_size=args.softmax_vocab_size)
  results = []
  start = time.perf_counter()
  for task in tasks:
    result = expert_eval.evaluate_task(
        loaded, task, split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
        expert_chunk=args.expert_chunk, max_input_length=args.max_input_length,
        max_target_length=args.max_target_length, beam_size=args.beam_size)
    best = max(loaded.names, key=lambda e: result.metrics[e][result.primary])
    print(f"{task}: {result.examples} examples, best {best} "
          f"{result.primary}={result.metrics[best][result.primary]:.1f}", file=sys.stderr)
    results.append(result)
  run = {k: v for k, v in vars(args).items() if not k.startswith("_")}
  run["experts"] = loaded.names
  if partitioning.is_primary():  # every process holds every result; one writes them
    expert_eval.write_reports(args.output_dir, results, loaded.names, run, overwrite=args.overwrite)
  partitioning.barrier("elm_jax.eval.reports")
  print(expert_eval.markdown_table(results, loaded.names))
  print(f"evaluated {len(loaded.names)} expert(s) on {len(tasks)} task(s) in "
        f"{time.perf_counter() - start:.1f}s -> {args.output_dir}", file=sys.stderr)
  return 0
