"""Each expert's own training plan, as the paper's code runs it, and the vmapped groups.

`prompt_expert_plan`, `dataset_expert_plan`, `full_dataset_expert_plan` and
`continual_expert_plan` turn one row of the ELM inventory (`tasks/elm_inventory.json`, made from
the paper's configs; ELM_NOTES §1.4-1.7, §2.3) into an `ExpertPlan`: which rows it trains on and
how they are drawn, how its prompts are used, epochs, batch size, steps, learning rate and
schedule, source and target lengths, dropout, seed, optimizer and where the data comes from.
`recipe_plans(recipe)` gives every expert of a recipe and `recipe_groups` cuts them into groups
that one vmapped program can train: experts whose shapes agree (batch size, source and target
length, dropout), at most `group_size` at a time; inside a group every expert keeps its own
steps and learning rate (`TrainConfig.expert_steps` / `expert_learning_rates`).

Rows: `inventory.train_sample` with `sampling_follows='code'` (default: the paper's code, whose
ten `official_code_whole_slice` task classes take their slice of the split whatever the config's
`max_train_samples`) or 'configs' (the configs' budgets). Steps are the paper's: epochs x
ceil(examples per epoch / batch) (HF Trainer, one device, no gradient accumulation; the
full-parameter dataset experts: effective batch 128), where the examples per epoch follow from
the split's rows: a prompt or continual expert's sample of its split, an adapter dataset
expert's samples of all its prompts together, a full-parameter dataset expert's min(100,000,
the dataset's rows). The rows are read from a local P3 copy's `stats.train.json` and the
continual experts' files when they are on this machine (`available_split_sizes`); without them
the plan states the budget's steps as an upper bound (`steps_exact=False`) and `elm-jax train`
counts them from the data before training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Mapping, Sequence, Union

from elm_jax.training.errors import TrainingError
from tasks import continual, inventory, mixtures

TARGET_LENGTH = 128            # max_target_length, left at its default in every PE/DE config
CONTINUAL_TARGET_LENGTH = 256  # the cT0 configs
DROPOUT = 0.1                  # T5's, as the paper's HF model trained with
SEED = 42
# The paper's recipes (`ExpertPlan.recipe`): prompt experts, adapter dataset experts, full-parameter
# dataset experts and continual experts.
RECIPES = ("prompt", "dataset", "dataset_full", "continual")
SAMPLING_FOLLOWS = inventory.SAMPLING_FOLLOWS
# How each recipe uses its prompts (`ExpertPlan.prompt_draw`).
ONE_PROMPT = "its one prompt"
EVERY_PROMPT = "every prompt, each on its own sample (concatenated)"
ONE_PER_EXAMPLE = ("one template drawn at random per example per epoch, among every template of the "
                   "dataset that applies to its label (trec, paws paraphrase-task and wiki_qa generation "
                   "templates excluded by label)")
NO_TEMPLATE_LIST = " (no P3 copy lists the dataset's templates here: its prompt-expert prompts stand in)"
# A split's row count, or for an adapter dataset expert one count per prompt.
Rows = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
  """How one expert trains. `samples` is how many rows of the split it takes (per prompt for an
  adapter dataset expert; None: all), `sampling` how: 'first' (the first `samples` rows, in file
  order), 'permutation' (the first `samples` of a seed-`seed` permutation) or 'all', out of the
  first `drawn_from` rows of the split (None: all of it). `prompt_draw` says how its `prompts`
  are used. `steps` = epochs x ceil(examples per epoch / batch_size), exact when the split's
  rows were known (`steps_exact`), else the budget's (an upper bound), or None for a whole split
  of unknown size. `recipe`: the recipe it belongs to, one of RECIPES."""
  name: str
  task: str
  recipe: str
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
  data: str                      # 'p3', 'raw+templates' (raw data, promptsource templates) or 'local files'
  drawn_from: Optional[int] = None
  prompt_draw: str = ONE_PROMPT

  def shape_key(self) -> tuple:
    """What experts of one vmapped program must share."""
    return (self.batch_size, self.input_length, self.target_length, self.dropout, self.optimizer,
            self.schedule, self.max_grad_norm, self.warmup_steps)

  @property
  def sample(self) -> inventory.TrainSample:
    return inventory.TrainSample(self.samples, self.sampling, self.drawn_from)

  def epoch_examples(self, rows: Rows) -> int:
    """Examples one epoch visits, given the split's rows (one count per prompt for an adapter
    dataset expert; a full-parameter dataset expert's: the dataset's rows)."""
    if self.recipe == "dataset":
      return sum(self.sample.rows(n) for n in rows)
    return self.sample.rows(rows)

  def upper_bound_examples(self) -> Optional[int]:
    """Examples per epoch when every split is at least the budget (None: unbounded)."""
    if self.samples is None:
      return self.drawn_from
    return self.samples * (len(self.prompts) if self.recipe == "dataset" else 1)

  def with_rows(self, rows: Rows) -> "ExpertPlan":
    """The plan with its exact steps for a split of `rows` rows."""
    steps = self.epochs * math.ceil(self.epoch_examples(rows) / self.batch_size)
    return dataclasses.replace(self, steps=steps, steps_exact=True)


def _with_steps(plan: ExpertPlan, rows: Optional[Rows]) -> ExpertPlan:
  """`plan` with exact steps from `rows`, or the budget's upper bound without them (None for a
  whole split of unknown size)."""
  if rows is not None:
    return plan.with_rows(rows)
  bound = plan.upper_bound_examples()
  steps = None if bound is None else plan.epochs * math.ceil(bound / plan.batch_size)
  return dataclasses.replace(plan, steps=steps, steps_exact=False)


def _data_path(dataset: str, subset: Optional[str]) -> str:
  return "raw+templates" if (dataset, subset) in mixtures.NOT_IN_P3 else "p3"


def _adapter_plan(**fields) -> ExpertPlan:
  """The prompt-expert optimizer (ELM_NOTES §1.4): AdamW decayed linearly to 0, no warm-up,
  clip 1.0, dropout 0.1, seed 42; steps filled in by `_with_steps`."""
  return ExpertPlan(steps=None, steps_exact=False, schedule="linear", warmup_steps=0, optimizer="adamw",
                    max_grad_norm=1.0, dropout=DROPOUT, seed=SEED, **fields)


def prompt_expert_plan(row: Mapping[str, Any], split_size: Optional[int] = None,
                       sampling_follows: str = "code") -> ExpertPlan:
  """A prompt expert (an `inventory.load_inventory()['prompt_experts']` row): adapters, AdamW at
  the row's rate, its rows (`inventory.train_sample`), epochs, batch and source length, targets
  128. `split_size`: its P3 subset's train rows."""
  sample = inventory.train_sample(row["dataset"], row["max_train_samples"], sampling_follows)
  plan = _adapter_plan(
      name=row["name"], task=mixtures.prompt_expert_task(row["name"]), recipe="prompt", dataset=row["dataset"],
      prompts=(row["prompt"],), samples=sample.samples, sampling=sample.sampling, drawn_from=sample.drawn_from,
      epochs=row["epochs"], batch_size=row["batch_size"], learning_rate=row["learning_rate"],
      input_length=row["max_source_length"], target_length=TARGET_LENGTH,
      data=_data_path(row["dataset"], row["subset"]))
  return _with_steps(plan, split_size)


def dataset_expert_plan(row: Mapping[str, Any], split_sizes: Optional[Mapping[str, int]] = None,
                        prompt_rows: Optional[Mapping[str, Mapping]] = None,
                        sampling_follows: str = "code") -> ExpertPlan:
  """An adapter dataset expert (an `inventory...['dataset_experts']` row): the paper's `*_all`
  config, i.e. the prompt-expert recipe on all the dataset's prompt-expert prompts, each on its
  own sample of the config's per-prompt budget (or the class's slice, `inventory.train_sample`),
  concatenated. wiki_bio has no `*_all` config and one prompt: its dataset expert follows that
  prompt expert's settings."""
  config = row["adapter_config"]
  if config is None:
    single = (prompt_rows or _prompt_rows())[row["prompt_experts"][0]]
    config = {k: single[k] for k in ("max_train_samples", "batch_size", "epochs", "learning_rate",
                                     "max_source_length")}
  sample = inventory.train_sample(row["dataset"], config["max_train_samples"], sampling_follows)
  prompts = tuple(row["prompt_experts"])
  sizes = [(split_sizes or {}).get(p) for p in prompts]
  plan = _adapter_plan(
      name=row["name"], task=mixtures.dataset_expert_mixture(row["name"]), recipe="dataset",
      dataset=row["dataset"], prompts=prompts, samples=sample.samples, sampling=sample.sampling,
      drawn_from=sample.drawn_from, prompt_draw=EVERY_PROMPT if len(prompts) > 1 else ONE_PROMPT,
      epochs=config["epochs"], batch_size=config["batch_size"], learning_rate=config["learning_rate"],
      input_length=config["max_source_length"], target_length=TARGET_LENGTH,
      data=_data_path(row["dataset"], row["subset"]))
  return _with_steps(plan, sizes if all(s is not None for s in sizes) else None)


# The companion full-parameter dataset experts (ELM_NOTES §1.6, [C] configs): Adafactor
# without parameter scaling or relative steps, constant 1e-4, clip 0.5, 5 epochs over at most
# 100k instances (a seed-42 shuffle of the dataset), inputs 512 / targets 128, effective batch
# 128 (1 per GPU x 32 accumulation x 4 GPUs), one template drawn per example per epoch. The
# code never resizes the embeddings: its softmax is over all 32,128 entries
# (experiments/elm_dataset_experts_full_xl.gin: softmax_vocab_size None).
FULL_DE = {"samples": 100_000, "epochs": 5, "batch_size": 128, "learning_rate": 1e-4,
           "max_grad_norm": 0.5, "input_length": 512, "target_length": 128}


def full_dataset_expert_plan(row: Mapping[str, Any], templates: Optional[Sequence[str]] = None,
                             dataset_rows: Optional[int] = None) -> ExpertPlan:
  """A full-fine-tuning dataset expert (one per dataset, `<dataset>_random_prompt`) on every
  template of its dataset (`templates`: `mixtures.dataset_templates`; without them the
  prompt-expert list stands in, and `prompt_draw` says so). `dataset_rows`: the dataset's train
  rows."""
  f = FULL_DE
  sample = mixtures.FULL_DE_SAMPLE
  plan = ExpertPlan(
      name=f"{row['name']}_full", task=mixtures.random_prompt_mixture(row["name"]), recipe="dataset_full",
      dataset=row["dataset"], prompts=tuple(templates or row["prompt_experts"]), samples=sample.samples,
      sampling=sample.sampling, prompt_draw=ONE_PER_EXAMPLE + ("" if templates else NO_TEMPLATE_LIST),
      epochs=f["epochs"], batch_size=f["batch_size"],
      steps=None, steps_exact=False, learning_rate=f["learning_rate"], schedule="constant", warmup_steps=0,
      optimizer="adafactor", max_grad_norm=f["max_grad_norm"], input_length=f["input_length"],
      target_length=f["target_length"], dropout=DROPOUT, seed=SEED, data=_data_path(row["dataset"], row["subset"]))
  return _with_steps(plan, dataset_rows)


def continual_expert_plan(expert: inventory.ContinualExpert, split_size: Optional[int] = None,
                          sampling_follows: str = "code") -> ExpertPlan:
  """One of the 10 continual (cT0) experts: adapters, lr 1e-4, inputs 512 / targets 256, at most
  100k examples of its training file drawn with seed 42 (wiki_auto: the whole file, as the
  paper's task class; `continual.expert_sample`), its own batch size and epochs (ELM_NOTES
  §2.3). `split_size`: its training file's rows."""
  sample = continual.expert_sample(expert, sampling_follows)
  plan = _adapter_plan(
      name=expert.name, task=expert.name, recipe="continual", dataset=expert.dataset, prompts=(expert.prompt,),
      samples=sample.samples, sampling=sample.sampling, epochs=expert.epochs, batch_size=expert.batch_size,
      learning_rate=1e-4, input_length=512, target_length=CONTINUAL_TARGET_LENGTH, data="local files")
  return _with_steps(plan, split_size)


def _prompt_rows() -> dict[str, Mapping]:
  return {p["name"]: p for p in inventory.load_inventory()["prompt_experts"]}


def full_dataset_rows(templates: Sequence[str], split_sizes: Mapping[str, int]) -> Optional[int]:
  """A dataset's train rows from its templates' P3 subsets: the largest (a label-dependent
  template's subset holds fewer), or None when one is unknown."""
  sizes = [split_sizes.get(t) for t in templates]
  return max(sizes) if sizes and all(s is not None for s in sizes) else None


def recipe_plans(recipe: str, split_sizes: Optional[Mapping[str, int]] = None, sampling_follows: str = "code",
                 data_dir: Optional[str] = None) -> list[ExpertPlan]:
  """Every expert of a recipe, in inventory order: 'prompt' (296), 'dataset' (36 adapter
  dataset experts), 'dataset_full' (36 full-parameter ones) or 'continual' (10). `split_sizes`
  maps P3 subset names and continual expert names to their train rows, for exact step counts;
  `data_dir` the P3 copy whose subsets list the full-parameter experts' templates."""
  inv = inventory.load_inventory()
  sizes = split_sizes or {}
  if sampling_follows not in SAMPLING_FOLLOWS:
    raise TrainingError(f"SAMPLING_FOLLOWS (sampling_follows): expected one of {list(SAMPLING_FOLLOWS)}, "
                        f"got {sampling_follows!r}")
  if recipe == "prompt":
    return [prompt_expert_plan(p, sizes.get(p["name"]), sampling_follows) for p in inv["prompt_experts"]]
  if recipe == "dataset":
    rows = _prompt_rows()
    return [dataset_expert_plan(d, sizes, rows, sampling_follows) for d in inv["dataset_experts"]]
  if recipe == "dataset_full":
    out = []
    for d in inv["dataset_experts"]:
      templates = mixtures.dataset_templates(d, data_dir, fallback=False)
      rows = full_dataset_rows(templates or d["prompt_experts"], sizes)
      out.append(full_dataset_expert_plan(d, templates, rows))
    return out
  if recipe == "continual":
    return [continual_expert_plan(e, sizes.get(e.name), sampling_follows) for e in inventory.CONTINUAL_EXPERTS]
  raise TrainingError(f"recipe: expected one of {RECIPES}, got {recipe!r}")


def recipe_groups(recipe: str, group_size: int, split_sizes: Optional[Mapping[str, int]] = None,
                  sampling_follows: str = "code", data_dir: Optional[str] = None) -> list[list[ExpertPlan]]:
  """The recipe's experts in vmapped groups: experts of one shape key, in inventory order,
  `group_size` at a time (a shape's last group may be smaller)."""
  if group_size < 1:
    raise TrainingError(f"group_size: expected a positive integer, got {group_size}")
  by_shape: dict[tuple, list[ExpertPlan]] = {}
  for plan in recipe_plans(recipe, split_sizes, sampling_follows, data_dir):
    by_shape.setdefault(plan.shape_key(), []).append(plan)
  return [plans[i:i + group_size] for plans in by_shape.values() for i in range(0, len(plans), group_size)]


def p3_split_sizes(data_dir: Optional[str] = None) -> dict[str, int]:
  """Train-split sizes of the prompt experts' P3 subsets and of every template subset of the
  dataset experts' datasets, from a local copy's stats files (no record is read; subsets
  without a stats file are left out)."""
  inv = inventory.load_inventory()
  names = {p["name"] for p in inv["prompt_experts"]}
  for d in inv["dataset_experts"]:
    names.update(mixtures.dataset_templates(d, data_dir))
  return mixtures.known_train_sizes(sorted(names), data_dir)


@dataclasses.dataclass(frozen=True)
class PlanGroup:
  """One vmapped group of a recipe, as `run.train` takes it: group `index` of
  `recipe_groups(recipe, group_size, sampling_follows=...)` ("" recipe: plans given as they are)."""
  plans: tuple[ExpertPlan, ...]
  recipe: str = ""
  index: int = 0
  group_size: int = 0
  sampling_follows: str = "code"

  def __post_init__(self):
    keys = {p.shape_key() for p in self.plans}
    if len(keys) != 1:
      raise TrainingError(f"experts {[p.name for p in self.plans]} do not share one shape (batch, "
                          f"lengths, dropout, optimizer): {sorted(keys)}")

  @property
  def first(self) -> ExpertPlan:
    return self.plans[0]

  def resolved(self, split_rows: Callable[[ExpertPlan], Optional[Rows]]) -> "PlanGroup":
    """The group with every inexact step count recomputed from `split_rows(plan)`: the rows of
    the expert's split (one count per prompt for an adapter dataset expert, the dataset's rows
    for a full-parameter one), or None when they cannot be known."""
    out = []
    for plan in self.plans:
      rows = None if plan.steps_exact else split_rows(plan)
      out.append(plan if rows is None else plan.with_rows(rows))
    return dataclasses.replace(self, plans=tuple(out))

  def all_groups(self, data_dir: Optional[str] = None) -> list[list[ExpertPlan]]:
    """Every group of this group's recipe, with the steps the data on this machine gives."""
    if not self.recipe:
      return [list(self.plans)]
    return recipe_groups(self.recipe, self.group_size, available_split_sizes(data_dir), self.sampling_follows,
                         data_dir)


def recipe_group(recipe: Optional[str] = None, group: Optional[int] = None, group_size: Optional[int] = None,
                 data_dir: Optional[str] = None, sampling_follows: str = "code", *,
                 kind: Optional[str] = None) -> PlanGroup:
  """Group `group` of `recipe_groups(recipe, group_size)`, for gin:
  `run.train.plan_group = @plans.recipe_group()`. Each value is checked, as the experiment
  files' macros bind them (RECIPE, GROUP, GROUP_SIZE, SAMPLING_FOLLOWS), before any plan is made.
  `kind` is the name gin files written before `recipe` bound it by (`plans.recipe_group.kind`),
  still accepted."""
  if kind is not None:
    if recipe is not None and recipe != kind:
      raise TrainingError(f"plans.recipe_group: recipe={recipe!r} and kind={kind!r} (its older name) "
                          "disagree; bind recipe only")
    recipe = kind
  if recipe not in RECIPES:
    raise TrainingError(f"RECIPE (plans.recipe_group.recipe): expected one of {list(RECIPES)}, got {recipe!r}")
  if not _is_count(group_size) or group_size < 1:
    raise TrainingError(f"GROUP_SIZE (plans.recipe_group.group_size): expected a positive integer, "
                        f"got {group_size!r}")
  if sampling_follows not in SAMPLING_FOLLOWS:
    raise TrainingError(f"SAMPLING_FOLLOWS (plans.recipe_group.sampling_follows): expected one of "
                        f"{list(SAMPLING_FOLLOWS)}, got {sampling_follows!r}")
  groups = recipe_groups(recipe, group_size, available_split_sizes(data_dir), sampling_follows, data_dir)
  if not _is_count(group) or not 0 <= group < len(groups):
    raise TrainingError(f"GROUP (plans.recipe_group.group): expected a group number 0..{len(groups) - 1} "
                        f"(the {recipe} recipe in groups of {group_size}), got {group!r}")
  return PlanGroup(tuple(groups[group]), recipe, group, group_size, sampling_follows)


def _is_count(value: Any) -> bool:
  """An int that is not a bool (gin reads `True` as a Python bool, which is an int)."""
  return isinstance(value, int) and not isinstance(value, bool)


def available_split_sizes(data_dir: Optional[str] = None, continual_dir: Optional[str] = None) -> dict[str, int]:
  """The train rows on this machine: `p3_split_sizes` from a local P3 copy's stats files when
  one is there (`data_dir` or $ELM_P3_DATA_DIR; no TFRecord is read) and the continual experts'
  training files' line counts when they are (`continual_dir` or $ELM_CONTINUAL_DATA_DIR)."""
  try:
    sizes = p3_split_sizes(data_dir)
  except mixtures.p3.P3DataError:
    sizes = {}
  sizes.update(continual.known_train_rows(continual_dir))
  return sizes


UPPER_BOUND_NOTE = ("steps marked '<=' are upper bounds (the budget's): the data is not on this machine "
                    "($ELM_P3_DATA_DIR's stats.train.json, $ELM_CONTINUAL_DATA_DIR's train.jsonl); "
                    "`elm-jax train` counts them from the data before it trains")


def describe(plans: Sequence[ExpertPlan], groups: Optional[Sequence[int]] = None) -> str:
  """A table of plans, one line each (what `elm-jax train --dry_run` prints); with `groups`,
  each plan's group index first; a last line says when steps are upper bounds."""
  lines = [("group | " if groups else "") + "name | samples (how) | prompts | epochs | batch | steps | lr | "
           "schedule | src/tgt | dropout | optimizer | data",
           "---|" * (12 + bool(groups))]
  for i, p in enumerate(plans):
    samples = "all" if p.samples is None else (f"{p.samples:,}" + (" per prompt" if p.recipe == "dataset" else ""))
    if p.drawn_from is not None:
      samples += f" of the first {p.drawn_from:,}"
    steps = ("whole split: size unknown" if p.steps is None else
             f"{p.steps:,}" if p.steps_exact else f"<= {p.steps:,}")
    prompts = {ONE_PROMPT: "1", EVERY_PROMPT: f"{len(p.prompts)}, each",
               ONE_PER_EXAMPLE: f"{len(p.prompts)}, one per example per epoch",
               ONE_PER_EXAMPLE + NO_TEMPLATE_LIST: f"{len(p.prompts)} (prompt experts'), one per example per "
                                                   "epoch"}.get(p.prompt_draw, p.prompt_draw)
    lines.append((f"{groups[i]} | " if groups else "") + f"{p.name} | {samples} ({p.sampling}) | {prompts} | "
                 f"{p.epochs} | {p.batch_size} | {steps} | {p.learning_rate:g} | {p.schedule} | "
                 f"{p.input_length}/{p.target_length} | {p.dropout:g} | {p.optimizer} (clip {p.max_grad_norm:g}) | "
                 f"{p.data}")
  if any(not p.steps_exact for p in plans):
    lines.append(UPPER_BOUND_NOTE)
  return "\n".join(lines)
