"""Each expert's own training plan, as the paper's configs set it, and the vmapped groups.

`prompt_expert_plan`, `dataset_expert_plan`, `full_dataset_expert_plan` and
`continual_expert_plan` turn one row of the ELM inventory (`tasks/elm_inventory.json`, made from
the paper's configs; ELM_NOTES §1.4-1.7, §2.3) into an `ExpertPlan`: the sample budget and how it
is drawn, epochs, batch size, steps, learning rate and schedule, source and target lengths,
dropout, seed, optimizer and where the data comes from. `recipe_plans(kind)` gives every
expert of a recipe and `recipe_groups` cuts them into groups that one vmapped program can train:
experts whose shapes agree (batch size, source and target length, dropout), at most
`group_size` at a time; inside a group every expert keeps its own steps and learning rate
(`TrainConfig.expert_steps` / `expert_learning_rates`).

Steps are the paper's: epochs x ceil(samples / batch) (HF Trainer, one device, no gradient
accumulation), where samples = min(budget, train split size). The split size is read from a
local P3 copy's `stats.train.json` when one is given (`split_sizes`); without it the plan
states the budget's steps as an upper bound (`steps_exact=False`) and `elm-jax train` resolves
them from the data before training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from elm_jax.training.errors import TrainingError
from tasks import inventory, mixtures

TARGET_LENGTH = 128            # max_target_length, left at its default in every PE/DE config
CONTINUAL_TARGET_LENGTH = 256  # the cT0 configs
DROPOUT = 0.1                  # T5's, as the paper's HF model trained with
SEED = 42
# Task classes of the paper's code that take the first N rows instead of a seed-42 permutation
# (ELM_NOTES §1.5).
FIRST_ROWS = {"wiki_hop", "amazon_polarity", "yelp_review_full", "dbpedia_14", "imdb", "gigaword",
              "multi_news"}
KINDS = ("prompt", "dataset", "dataset_full", "continual")


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
  """How one expert trains. `samples` is the budget (None: the whole split); `sampling` says how
  it is drawn: 'permutation' (the first `samples` of a seed-`seed` permutation of the train
  split), 'first' (the first `samples` rows) or 'all'. `steps` = epochs x ceil(min(samples,
  split) / batch_size), exact when the split size was known (`steps_exact`), else the budget's
  (an upper bound), or None for a whole split of unknown size."""
  name: str
  task: str
  kind: str
  dataset: str
  prompts: tuple[str, ...]
  samples: Optional[int]
  sampling: str
  epochs: int
  batch_size: int
  steps: Optional[int]
  steps_exact: bool
  learning_rate: float
  schedule: str
  warmup_steps: int
  optimizer: str
  max_grad_norm: float
  input_length: int
  target_length: int
  dropout: float
  seed: int
  data: str                      # 'p3' (a P3 subset) or 'raw+templates' (raw data, promptsource templates)

  def shape_key(self) -> tuple:
    """What experts of one vmapped program must share."""
    return (self.batch_size, self.input_length, self.target_length, self.dropout, self.optimizer,
            self.schedule, self.max_grad_norm, self.warmup_steps)


def _steps(samples: Optional[int], split: Optional[int], epochs: int, batch: int) -> tuple[Optional[int], bool]:
  """(steps, exact): exact with the split's size; without it, the budget's steps as an upper
  bound, or None for a whole split of unknown size."""
  if split is not None:
    n = split if samples is None else min(samples, split)
    return epochs * math.ceil(n / batch), True
  if samples is None:
    return None, False
  return epochs * math.ceil(samples / batch), False


def _data_path(dataset: str, subset: Optional[str]) -> str:
  return "raw+templates" if (dataset, subset) in mixtures.NOT_IN_P3 else "p3"


def prompt_expert_plan(row: Mapping[str, Any], split_size: Optional[int] = None) -> ExpertPlan:
  """A prompt expert (an `inventory.load_inventory()['prompt_experts']` row): adapters, AdamW at
  the row's rate decayed linearly to 0, no warm-up, clip 1.0, its budget, epochs, batch and
  source length, targets 128, dropout 0.1, seed 42."""
  samples = row["max_train_samples"]
  sampling = "all" if samples is None else ("first" if row["dataset"] in FIRST_ROWS else "permutation")
  steps, exact = _steps(samples, split_size, row["epochs"], row["batch_size"])
  return ExpertPlan(
      name=row["name"], task=mixtures.prompt_expert_task(row["name"]), kind="prompt", dataset=row["dataset"],
      prompts=(row["prompt"],), samples=samples, sampling=sampling, epochs=row["epochs"],
      batch_size=row["batch_size"], steps=steps, steps_exact=exact, learning_rate=row["learning_rate"],
      schedule="linear", warmup_steps=0, optimizer="adamw", max_grad_norm=1.0,
      input_length=row["max_source_length"], target_length=TARGET_LENGTH, dropout=DROPOUT, seed=SEED,
      data=_data_path(row["dataset"], row["subset"]))


def dataset_expert_plan(row: Mapping[str, Any], split_sizes: Optional[Mapping[str, int]] = None,
                        prompt_rows: Optional[Mapping[str, Mapping]] = None) -> ExpertPlan:
  """An adapter dataset expert (an `inventory...['dataset_experts']` row): the paper's `*_all`
  config, i.e. the prompt-expert recipe on all the dataset's prompts, each cut to the config's
  per-prompt budget. wiki_bio has no `*_all` config and one prompt: its dataset expert follows
  that prompt expert's settings."""
  config = row["adapter_config"]
  if config is None:
    single = (prompt_rows or _prompt_rows())[row["prompt_experts"][0]]
    config = {k: single[k] for k in ("max_train_samples", "batch_size", "epochs", "learning_rate",
                                     "max_source_length")}
  per_prompt = config["max_train_samples"]
  prompts = tuple(row["prompt_experts"])
  sizes = [None if split_sizes is None else split_sizes.get(p) for p in prompts]
  if all(s is not None for s in sizes):
    n = sum(s if per_prompt is None else min(per_prompt, s) for s in sizes)
    steps, exact = config["epochs"] * math.ceil(n / config["batch_size"]), True
  else:
    steps, exact = _steps(None if per_prompt is None else per_prompt * len(prompts), None,
                          config["epochs"], config["batch_size"])
  sampling = "all" if per_prompt is None else ("first" if row["dataset"] in FIRST_ROWS else "permutation")
  return ExpertPlan(
      name=row["name"], task=mixtures.dataset_expert_mixture(row["name"]), kind="dataset",
      dataset=row["dataset"], prompts=prompts, samples=per_prompt, sampling=sampling,
      epochs=config["epochs"], batch_size=config["batch_size"], steps=steps, steps_exact=exact,
      learning_rate=config["learning_rate"], schedule="linear", warmup_steps=0, optimizer="adamw",
      max_grad_norm=1.0, input_length=config["max_source_length"], target_length=TARGET_LENGTH,
      dropout=DROPOUT, seed=SEED, data=_data_path(row["dataset"], row["subset"]))


# The companion full-parameter dataset experts (ELM_NOTES §1.6, [C] configs): Adafactor
# without parameter scaling or relative steps, constant 1e-4, clip 0.5, 5 epochs over at most
# 100k instances, inputs 512 / targets 128, effective batch 128, a random prompt per example.
FULL_DE = {"samples": 100_000, "epochs": 5, "batch_size": 128, "learning_rate": 1e-4,
           "max_grad_norm": 0.5, "input_length": 512, "target_length": 128}


def full_dataset_expert_plan(row: Mapping[str, Any]) -> ExpertPlan:
  """A full-fine-tuning dataset expert (one per dataset, `<dataset>_random_prompt`)."""
  f = FULL_DE
  steps, exact = _steps(f["samples"], None, f["epochs"], f["batch_size"])
  return ExpertPlan(
      name=f"{row['name']}_full", task=mixtures.random_prompt_mixture(row["name"]), kind="dataset_full",
      dataset=row["dataset"], prompts=tuple(row["prompt_experts"]), samples=f["samples"],
      sampling="permutation", epochs=f["epochs"], batch_size=f["batch_size"], steps=steps,
      steps_exact=exact, learning_rate=f["learning_rate"], schedule="constant", warmup_steps=0,
      optimizer="adafactor", max_grad_norm=f["max_grad_norm"], input_length=f["input_length"],
      target_length=f["target_length"], dropout=DROPOUT, seed=SEED,
      data=_data_path(row["dataset"], row["subset"]))


def continual_expert_plan(expert: inventory.ContinualExpert, split_size: Optional[int] = None) -> ExpertPlan:
  """One of the 10 continual (cT0) experts: adapters, lr 1e-4, inputs 512 / targets 256, at most
  100k examples, its own batch size and epochs (ELM_NOTES §2.3)."""
  steps, exact = _steps(expert.max_samples, split_size, expert.epochs, expert.batch_size)
  return ExpertPlan(
      name=expert.name, task=expert.name, kind="continual", dataset=expert.dataset,
      prompts=(expert.prompt,), samples=expert.max_samples, sampling="permutation", epochs=expert.epochs,
      batch_size=expert.batch_size, steps=steps, steps_exact=exact, learning_rate=1e-4,
      schedule="linear", warmup_steps=0, optimizer="adamw", max_grad_norm=1.0, input_length=512,
      target_length=CONTINUAL_TARGET_LENGTH, dropout=DROPOUT, seed=SEED, data="local files")


def _prompt_rows() -> dict[str, Mapping]:
  return {p["name"]: p for p in inventory.load_inventory()["prompt_experts"]}


def recipe_plans(kind: str, split_sizes: Optional[Mapping[str, int]] = None) -> list[ExpertPlan]:
  """Every expert of a recipe, in inventory order: 'prompt' (296), 'dataset' (36 adapter
  dataset experts), 'dataset_full' (36 full-parameter ones) or 'continual' (10). `split_sizes`
  maps P3 subset (prompt expert) names to their train-split sizes, for exact step counts."""
  inv = inventory.load_inventory()
  sizes = split_sizes or {}
  if kind == "prompt":
    return [prompt_expert_plan(p, sizes.get(p["name"])) for p in inv["prompt_experts"]]
  if kind == "dataset":
    rows = _prompt_rows()
    return [dataset_expert_plan(d, sizes if sizes else None, rows) for d in inv["dataset_experts"]]
  if kind == "dataset_full":
    return [full_dataset_expert_plan(d) for d in inv["dataset_experts"]]
  if kind == "continual":
    return [continual_expert_plan(e, sizes.get(e.name)) for e in inventory.CONTINUAL_EXPERTS]
  raise TrainingError(f"recipe kind: expected one of {KINDS}, got {kind!r}")


def recipe_groups(kind: str, group_size: int, split_sizes: Optional[Mapping[str, int]] = None
                  ) -> list[list[ExpertPlan]]:
  """The recipe's experts in vmapped groups: experts of one shape key, in inventory order,
  `group_size` at a time (a shape's last group may be smaller)."""
  if group_size < 1:
    raise TrainingError(f"group_size: expected a positive integer, got {group_size}")
  by_shape: dict[tuple, list[ExpertPlan]] = {}
  for plan in recipe_plans(kind, split_sizes):
    by_shape.setdefault(plan.shape_key(), []).append(plan)
  return [plans[i:i + group_size] for plans in by_shape.values() for i in range(0, len(plans), group_size)]


def p3_split_sizes(data_dir: Optional[str] = None) -> dict[str, int]:
  """Train-split sizes of the prompt experts' P3 subsets from a local copy's stats files (no
  record is read; subsets without a stats file are left out)."""
  return mixtures.known_train_sizes([p["name"] for p in inventory.load_inventory()["prompt_experts"]], data_dir)


@dataclasses.dataclass(frozen=True)
class PlanGroup:
  """One vmapped group of a recipe, as `run.train` takes it: group `index` of
  `recipe_groups(kind, group_size)`."""
  plans: tuple[ExpertPlan, ...]
  kind: str = ""
  index: int = 0
  group_size: int = 0

  def __post_init__(self):
    keys = {p.shape_key() for p in self.plans}
    if len(keys) != 1:
      raise TrainingError(f"experts {[p.name for p in self.plans]} do not share one shape (batch, "
                          f"lengths, dropout, optimizer): {sorted(keys)}")

  @property
  def first(self) -> ExpertPlan:
    return self.plans[0]

  def resolved(self, split_size: Callable[[ExpertPlan], Optional[int]]) -> "PlanGroup":
    """The group with every inexact step count recomputed from `split_size(plan)` (a count of
    the expert's training examples before its budget)."""
    out = []
    for plan in self.plans:
      if plan.steps_exact:
        out.append(plan)
        continue
      size = split_size(plan)
      if size is None:
        out.append(plan)
        continue
      budget = plan.samples if plan.kind != "dataset" or plan.samples is None else plan.samples * len(plan.prompts)
      steps, _ = _steps(budget, size, plan.epochs, plan.batch_size)
      out.append(dataclasses.replace(plan, steps=steps, steps_exact=True))
    return dataclasses.replace(self, plans=tuple(out))


def recipe_group(kind: str, group: int, group_size: int, data_dir: Optional[str] = None) -> PlanGroup:
  """Group `group` of `recipe_groups(kind, group_size)`, for gin:
  `run.train.plan_group = @plans.recipe_group()`. Each value is checked, as the experiment
  files' macros bind them (RECIPE, GROUP, GROUP_SIZE), before any plan is made."""
  if kind not in KINDS:
    raise TrainingError(f"RECIPE (plans.recipe_group.kind): expected one of {list(KINDS)}, got {kind!r}")
  if not _is_count(group_size) or group_size < 1:
    raise TrainingError(f"GROUP_SIZE (plans.recipe_group.group_size): expected a positive integer, "
                        f"got {group_size!r}")
  groups = recipe_groups(kind, group_size, available_split_sizes(data_dir))
  if not _is_count(group) or not 0 <= group < len(groups):
    raise TrainingError(f"GROUP (plans.recipe_group.group): expected a group number 0..{len(groups) - 1} "
                        f"(the {kind} recipe in groups of {group_size}), got {group!r}")
  return PlanGroup(tuple(groups[group]), kind, group, group_size)


def _is_count(value: Any) -> bool:
  """An int that is not a bool (gin reads `True` as a Python bool, which is an int)."""
  return isinstance(value, int) and not isinstance(value, bool)


def available_split_sizes(data_dir: Optional[str]) -> dict[str, int]:
  """`p3_split_sizes` when a local P3 copy is there, else nothing."""
  try:
    return p3_split_sizes(data_dir)
  except mixtures.p3.P3DataError:
    return {}


def describe(plans: Sequence[ExpertPlan], groups: Optional[Sequence[int]] = None) -> str:
  """A table of plans, one line each (what `elm-jax train --dry_run` prints); with `groups`,
  each plan's group index first."""
  lines = [("group | " if groups else "") + "name | samples (how) | epochs | batch | steps | lr | "
           "schedule | src/tgt | dropout | optimizer | data",
           "---|" * (11 + bool(groups))]
  for i, p in enumerate(plans):
    samples = "all" if p.samples is None else (f"{p.samples:,}" + (" per prompt" if p.kind == "dataset" else ""))
    steps = ("whole split: size unknown" if p.steps is None else
             f"{p.steps:,}" if p.steps_exact else f"<= {p.steps:,}")
    lines.append((f"{groups[i]} | " if groups else "") + f"{p.name} | {samples} ({p.sampling}) | {p.epochs} | {p.batch_size} | {steps} | "
                 f"{p.learning_rate:g} | {p.schedule} | {p.input_length}/{p.target_length} | {p.dropout:g} | "
                 f"{p.optimizer} (clip {p.max_grad_norm:g}) | {p.data}")
  return "\n".join(lines)
