"""SeqIO tasks and mixtures of the ELM inventory over a local P3 copy.

- `elm_pe_<p3 subset>`: one task per prompt expert (296), its training data cut to the expert's
  sample budget: the first N after a seeded shuffle (seed 42, buffer max(N, 10k)). The paper
  took torch.randperm(seed=42) over the whole split, so the same number of examples, not the
  same examples.
- `<dataset>_all_prompts`: one mixture per dataset expert (36), each prompt capped at the
  dataset expert's per-prompt budget.
- `t0_train`: every training prompt, mixed at T0's rate: a prompt's train-example count, or
  500,000 / (the dataset's prompt count) when the dataset has more than 500,000 examples.
- `t0_eval_score`: the 113 original-task held-out prompts (P3 `_score_eval` subsets), scored by
  rank classification.

Registration reads no data: counts for mixing rates are read when a mixture is first used.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError
from tasks import inventory, p3, rank_classification, templated

T0_MAX_EXAMPLES_PER_DATASET = 500_000
SHUFFLE_SEED = 42


class MixtureError(UserInputError):
  """A mixture that names a task no one registered."""


def add_mixture(name: str, members, default_rate=1.0, source: str = "mixture definition") -> None:
  """Registers a SeqIO mixture after checking that every member task or mixture exists
  (idempotent: an existing mixture of that name is left as it is)."""
  if name in seqio.MixtureRegistry.names():
    return
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  missing = [m for m in members if (m[0] if isinstance(m, tuple) else m) not in known]
  if missing:
    raise MixtureError(f"{source}: mixture {name!r} names unregistered task(s) {missing}; "
                       "register them first (see `elm-jax tasks list`)")
  seqio.MixtureRegistry.add(name, list(members), default_rate=default_rate)


def _take_budget(budget: Optional[int]):
  def preprocess(dataset):
    if budget is None:
      return dataset
    return dataset.shuffle(max(budget, 10_000), seed=SHUFFLE_SEED,
                           reshuffle_each_iteration=False).take(budget)
  return preprocess


def num_train_examples(subset: str, data_dir: Optional[str] = None) -> int:
  """Train-split size of a P3 subset: `stats.train.json`'s `examples`, else a record count."""
  directory = os.path.join(p3.p3_data_root(data_dir), subset)
  stats = os.path.join(directory, "stats.train.json")
  if os.path.isfile(stats):
    with open(stats) as f:
      return int(json.load(f)["examples"])
  return _count_records(tuple(p3.shard_files(directory, "train")))


@functools.lru_cache(maxsize=None)
def _count_records(files: tuple[str, ...]) -> int:
  tf = tf_input.tensorflow()
  return int(sum(1 for f in files for _ in tf.data.TFRecordDataset(f)))


def register_elm_tasks(data_dir: Optional[str] = None) -> dict[str, list[str]]:
  """Registers the prompt-expert tasks and the mixtures above; returns mixture -> members."""

  inv = inventory.load_inventory()
  registered: dict[str, list[str]] = {}
  prompts_per_dataset: dict[str, int] = {}
  for de in inv["dataset_experts"]:
    prompts_per_dataset.update({name: len(de["prompt_experts"]) for name in de["prompt_experts"]})

  for pe in inv["prompt_experts"]:
    p3.register_p3_task(pe["name"], data_dir)  # the raw P3 subset, under its own name
    _register_budgeted(seqio, f"elm_pe_{pe['name']}", pe["name"], pe["max_train_samples"], data_dir)

  for de in inv["dataset_experts"]:
    budget = (de["adapter_config"] or {}).get("max_train_samples")
    members = []
    for name in de["prompt_experts"]:
      members.append(_register_budgeted(seqio, f"elm_de_{name}", name, budget, data_dir))
    mixture = f"{de['name']}_all_prompts"
    add_mixture(mixture, members)
    registered[mixture] = members

  def t0_rate(task) -> float:
    count = num_train_examples(task.name, data_dir)
    if count > T0_MAX_EXAMPLES_PER_DATASET:
      return T0_MAX_EXAMPLES_PER_DATASET // prompts_per_dataset[task.name]
    return count

  train = [pe["name"] for pe in inv["prompt_experts"]]
  add_mixture("t0_train", train, default_rate=t0_rate)
  registered["t0_train"] = train

  held_out = []
  for entry in inv["held_out"]:
    if not entry["original_task"]:
      continue
    name = inventory.held_out_task_name(entry)
    p3.register_p3_task(name, data_dir,
                        postprocess_fn=rank_classification.rank_classification_postprocessor,
                        metric_fns=[rank_classification.seqio_rank_classification])
    held_out.append(name)
  add_mixture(inventory.HELD_OUT_MIXTURE, held_out)
  registered[inventory.HELD_OUT_MIXTURE] = held_out
  return registered


def _register_budgeted(seqio, name: str, subset: str, budget: Optional[int], data_dir) -> str:
  if name not in seqio.TaskRegistry.names():
    raw = seqio.TaskRegistry.get(subset) if subset in seqio.TaskRegistry.names() else \
        p3.register_p3_task(subset, data_dir)
    seqio.TaskRegistry.add(name, source=raw.source, output_features=raw.output_features,
                           preprocessors=[_take_budget(budget)], metric_fns=[])
  return name


def register_bigbench_13(data_dir: str, vocabulary) -> list[str]:
  """The paper's 13 BIG-bench tasks from a BIG-bench checkout's `benchmark_tasks` directory
  (`<task>/task.json`, or `<task>/<subtask>/task.json` for tasks with sub-tasks) as
  `bigbench_<task>[_<subtask>]` tasks and the mixture `bigbench_13` of their _score_eval twins.
  Files are read when a dataset is requested."""

  members = []
  for entry in inventory.load_inventory()["bigbench"]:
    for subtask in entry["subtasks"] or [None]:
      parts = [entry["task"]] + ([subtask] if subtask else [])
      path = os.path.join(data_dir, *parts, "task.json")
      names = templated.register_bigbench_task("bigbench_" + "_".join(parts), path, vocabulary)
      members.append(names[-1])
  add_mixture(inventory.BIGBENCH_MIXTURE, members)
  return members
