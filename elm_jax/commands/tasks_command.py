"""`elm-jax tasks list [--mixture NAME]`: the task inventory, with no data present."""

from __future__ import annotations

import argparse
import collections

from elm_jax.errors import UserInputError
from tasks import builtin_suite, inventory


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("action", choices=("list",))
  parser.add_argument("--mixture", default=None, help="list the member tasks of this mixture")


def main(args: argparse.Namespace) -> int:
  mixtures = inventory.mixtures()
  if args.mixture:
    if args.mixture not in mixtures:
      raise UserInputError(f"--mixture={args.mixture}: unknown mixture; expected one of "
                           f"{', '.join(sorted(mixtures))}")
    for name in mixtures[args.mixture]:
      print(name)
    return 0
  inv = inventory.load_inventory()
  experts = inv["prompt_experts"]
  print(f"Prompt experts ({len(experts)} tasks over {len(inv['dataset_experts'])} datasets; "
        f"mixture {inventory.PROMPT_EXPERTS_MIXTURE}):")
  for p in experts:
    budget = p["max_train_samples"] if p["max_train_samples"] is not None else "all"
    print(f"  {p['name']}  (samples {budget}, batch {p['batch_size']}, epochs {p['epochs']}, "
          f"lr {p['learning_rate']}, source len {p['max_source_length']})")
  print(f"\nDataset-expert mixtures ({len(inv['dataset_experts'])}):")
  for de in inv["dataset_experts"]:
    print(f"  {de['name']}_all_prompts  ({len(de['prompt_experts'])} prompts)")
  held = [h for h in inv["held_out"] if h["original_task"]]
  counts = collections.Counter(h["dataset"] for h in held)
  print(f"\nHeld-out suite {inventory.HELD_OUT_MIXTURE} ({len(counts)} datasets, {len(held)} "
        "original-task prompts, rank classification):")
  for dataset, n in counts.items():
    print(f"  {dataset}: {n} prompts")
  print(f"\nBIG-bench ({inventory.BIGBENCH_MIXTURE}, {len(inv['bigbench'])} tasks; sub-tasks grouped "
        "into their task, as the paper reports them):")
  for b in inv["bigbench"]:
    print(f"  {b['task']}" + (f" ({', '.join(b['subtasks'])})" if b["subtasks"] else ""))
  print(f"\nContinual experts ({inventory.CONTINUAL_MIXTURE}: the {len(inv['continual'])} cT0 tasks, "
        "gigaword with constraints as 3):")
  for e in inventory.CONTINUAL_EXPERTS:
    print(f"  {e.name}: {e.task}, prompt {e.prompt}, batch {e.batch_size}, {e.epochs} epoch(s), "
          f"metric {e.metric}" + (f" (reported here: {e.metric_here})" if e.metric == "BERTScore" else ""))
  print(f"\nCompositional: {inv['compositional']}")
  print("\nBuilt-in suite (no download; registered by tasks.builtin_registry.register_builtin_suite):")
  for spec in builtin_suite.SUITE:
    print(f"  {builtin_suite.describe(spec)}")
  return 0
