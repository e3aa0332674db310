"""Training from a checkpoint directory: the Python API behind `elm-jax train` and the demo.

`train` loads the backbone (a Hugging Face or T5X checkpoint; a randomly initialised one,
saved beside the run, when none is given; or a Mixture-of-Experts model upcycled from a dense
checkpoint), checks everything that can be checked before it does, and runs the trainer. Gin
run files (`gin_configs/runs/*.gin`) bind its keyword arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import seqio

from elm_jax import defaults, files, partitioning
from elm_jax.checkpoints import expert_files, hf, loading
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from elm_jax.models.upcycling import upcycle_params
from elm_jax.training import checkpointing, inputs, plans, trainer
from elm_jax.training import train_step as ts
from tasks import continual, mixtures


def train(model_dir: str, expert_tasks: Optional[Sequence[str]] = None, steps: Optional[int] = None, *,
          model_config: T5Config, backbone_checkpoint: Optional[str] = None,
          expert_names: Optional[Sequence[str]] = None, batch_size: int = 8,
          input_length: int = defaults.TRAIN_INPUT_LENGTH,
          target_length: int = defaults.TRAIN_TARGET_LENGTH, seed: int = defaults.SEED,
          save_every: int = 100, keep: int = 3, log_every: int = 10,
          expert_config: ExpertConfig = ExpertConfig(),
          optimizer_config: ts.OptimizerConfig = ts.OptimizerConfig(),
          setup: Sequence[Callable] = (), progress: bool = True,
          mesh_config: Optional[partitioning.MeshConfig] = None,
          upcycle: bool = False,
          logical_axis_rules: Optional[Sequence] = None, shared_init: bool = True,
          plan_group: Optional[plans.PlanGroup] = None, dry_run: bool = False,
          data_dir: Optional[str] = None, plan: Optional[Callable[["RunLayout"], Any]] = None,
          all_shapes: bool = False):
  """Trains one expert per entry of `expert_tasks` over the backbone in `backbone_checkpoint`
  (Hugging Face or T5X directory), or over a randomly initialised `model_config` when none is
  given (useful only for smoke tests and the demo's own pretraining). With `mesh_config`, the
  experts are sharded over the mesh's `expert` axis and each expert's batch over `data`
  (`logical_axis_rules`, e.g. `partitioning.MOE_RULES`, replaces the default table).

  `upcycle=True` trains a Mixture-of-Experts `model_config` (with `moe` set) built from the
  dense `backbone_checkpoint` by sparse upcycling; use it with `expert_config.kind='full'`.

  `shared_init` (default, as the paper) starts every expert's adapters from the same random
  draw, which is what makes averaging experts meaningful; False draws them per expert.

  `plan_group` (a group of one of the paper's recipes, `plans.recipe_group`) sets the tasks,
  names, batch size, lengths, dropout and optimizer, and each expert's own steps and learning
  rate; step counts the plan could not know without the data are counted first, for every
  recipe (`_split_rows`: the P3 copy in `data_dir` or $ELM_P3_DATA_DIR, the continual experts'
  files in $ELM_CONTINUAL_DATA_DIR); EXPERT_TASKS, EXPERT_NAMES or TRAIN_STEPS bound beside it
  are refused, not ignored. `dry_run` prints the plans of the whole recipe, with the steps the
  split sizes on this machine give (P3 stats files, line counts of the continual files) and upper
  bounds, said to be so, where the data is not here (without a recipe: each expert's steps,
  batch, lengths and optimizer, the model, backbone and mesh) and returns without building the
  model.

  While it trains, the run holds `<model_dir>/train.lock` (`checkpointing.hold_run_lock`): a
  second run started on the same MODEL_DIR is refused, naming this one.

  `plan` (what `elm-jax plan` passes) is called with the run's `RunLayout` (its train-step
  shapes, model, optimizer and mesh; with `all_shapes`, every distinct shape of the whole
  recipe) instead of training, and its result returned; nothing is read or loaded.

  These are the names gin run files bind (`run.train.NAME`); the body groups them
  (`ModelSettings`, `BackboneSource`, `Placement` and the run as asked, a `TrainConfig`) for
  `_train`."""
  del setup  # gin evaluates `@register_fn()` references in it before this body runs
  # The run as asked (checked, and completed by a recipe group, in `_train`).
  asked = trainer.TrainConfig(
      model_dir=model_dir, expert_tasks=expert_tasks, steps=steps, batch_size=batch_size,
      input_length=input_length, target_length=target_length, expert_names=expert_names, seed=seed,
      save_every=save_every, keep=keep, log_every=log_every, shared_init=shared_init)
  return _train(asked, ModelSettings(model_config, expert_config, optimizer_config),
                BackboneSource(backbone_checkpoint, upcycle), Placement(mesh_config, logical_axis_rules),
                plan_group=plan_group, data_dir=data_dir, dry_run=dry_run, plan=plan, all_shapes=all_shapes,
                progress=progress)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """What a run trains: the model (architecture and training settings: dropout, activation
  dtype, the softmax's vocabulary), its experts' kind and shape, and their optimizer."""
  model_config: T5Config
  expert_config: ExpertConfig = ExpertConfig()
  optimizer_config: ts.OptimizerConfig = ts.OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class BackboneSource:
  """Where the frozen backbone comes from: a Hugging Face or T5X `checkpoint` (None: a randomly
  initialised one, saved beside the run), upcycled to the model's Mixture-of-Experts when
  `upcycle`."""
  checkpoint: Optional[str] = None
  upcycle: bool = False


@dataclasses.dataclass(frozen=True)
class Placement:
  """The devices a run uses: `mesh_config` (None: one device) and the logical-axis rules
  (None: `partitioning.DEFAULT_RULES`)."""
  mesh_config: Optional[partitioning.MeshConfig] = None
  logical_axis_rules: Optional[Sequence] = None


def _train(asked: trainer.TrainConfig, settings: ModelSettings, source: BackboneSource, placement: Placement, *,
           plan_group: Optional[plans.PlanGroup], data_dir: Optional[str], dry_run: bool,
           plan: Optional[Callable[["RunLayout"], Any]], all_shapes: bool, progress: bool):
  """`train` on its arguments in groups: `asked` holds the run's own values as given (tasks,
  names and steps None when a recipe group sets them)."""
  if plan_group is not None:
    _check_recipe_owns(asked.expert_tasks, asked.expert_names, asked.steps)
  if plan is not None:
    return plan(run_layout(plan_group, asked.expert_tasks, model_config=settings.model_config,
                           batch_size=asked.batch_size, input_length=asked.input_length,
                           target_length=asked.target_length, expert_config=settings.expert_config,
                           optimizer_config=settings.optimizer_config, mesh_config=placement.mesh_config,
                           logical_axis_rules=placement.logical_axis_rules, all_shapes=all_shapes))
  if plan_group is not None and dry_run:
    print(recipe_table(plan_group, data_dir))
    return {}
  config, settings = _run_config(asked, settings, plan_group, data_dir)
  if dry_run:  # the run's devices are not this machine's: its mesh is shown, not checked
    print(run_table(config, settings, source, placement))
    return {}
  if placement.mesh_config is not None:
    _check_mesh(placement.mesh_config, len(config.expert_tasks), config.batch_size)
  inputs.check_tasks(config.expert_tasks, settings.model_config.vocab_size)
  if source.upcycle and (not source.checkpoint or settings.model_config.moe is None):
    raise trainer.TrainingError("train.upcycle: needs a dense BACKBONE_CHECKPOINT and a model "
                                "config with `moe` set")
  # One run at a time writes MODEL_DIR: a second is refused here, before a backbone is loaded.
  # With several processes, process 0 holds the lock for the run. The lock is a kernel file
  # lock: a MODEL_DIR in a bucket (gs://) has none, and is not locked.
  locked = partitioning.is_primary() and files.is_local(config.model_dir)
  if locked:
    os.makedirs(config.model_dir, exist_ok=True)
  with (checkpointing.hold_run_lock(config.model_dir) if locked else contextlib.nullcontext()):
    return _train_locked(config, settings, source, placement, progress)


def _run_config(asked: trainer.TrainConfig, settings: ModelSettings, plan_group: Optional[plans.PlanGroup],
                data_dir: Optional[str]) -> tuple[trainer.TrainConfig, ModelSettings]:
  """The checked TrainConfig of the run, and its model settings: `asked`, or with a
  `plan_group` its plans' tasks, names, steps (counted from the data where the plan could not
  know them), learning rates, batch, lengths, seed, dropout and optimizer."""
  expert_steps = expert_learning_rates = None
  if plan_group is not None:
    plan_group = plan_group.resolved(lambda plan: _split_rows(plan, data_dir))
    unknown = [p.name for p in plan_group.plans if not p.steps_exact]
    if unknown:  # never train an upper bound: the steps follow from the data
      raise trainer.TrainingError(f"plan_group: the step counts of {unknown} need their train splits' "
                                  "sizes; set ELM_P3_DATA_DIR (or data_dir) to the P3 copy, or "
                                  "ELM_CONTINUAL_DATA_DIR to the continual experts' files")
    first = plan_group.first
    expert_steps = tuple(p.steps for p in plan_group.plans)
    expert_learning_rates = tuple(p.learning_rate for p in plan_group.plans)
    asked = dataclasses.replace(
        asked, expert_tasks=[p.task for p in plan_group.plans], expert_names=[p.name for p in plan_group.plans],
        steps=max(expert_steps), batch_size=first.batch_size, input_length=first.input_length,
        target_length=first.target_length, seed=first.seed)
    model_config, optimizer_config = _group_settings(first, settings.model_config, settings.optimizer_config)
    settings = dataclasses.replace(settings, model_config=model_config, optimizer_config=optimizer_config)
  if asked.expert_tasks is None or asked.steps is None:
    raise trainer.TrainingError("train: pass expert_tasks and steps (EXPERT_TASKS, TRAIN_STEPS), or a "
                                "plan_group")
  # Everything that can be checked without the backbone is checked before it is loaded.
  for field, value in (("EXPERT_TASKS", asked.expert_tasks), ("EXPERT_NAMES", asked.expert_names)):
    if isinstance(value, str) or (value is not None and not isinstance(value, (list, tuple))):
      raise trainer.TrainingError(f"{field}: expected a list of names, e.g. ['task_a', 'task_b'], "
                                  f"got {value!r}")
  config = dataclasses.replace(
      asked, expert_tasks=tuple(asked.expert_tasks),
      expert_names=tuple(asked.expert_names) if asked.expert_names else None,
      expert_steps=expert_steps, expert_learning_rates=expert_learning_rates)
  config.names()
  trainer.check_settings(config)
  return config, settings


def _check_recipe_owns(expert_tasks, expert_names, steps) -> None:
  """Refuses EXPERT_TASKS, EXPERT_NAMES or TRAIN_STEPS bound beside a recipe (run.train.plan_group),
  which sets them itself: they would be ignored without a word (the experiment files bind None)."""
  for macro, value, sets in (("EXPERT_TASKS", expert_tasks, "the tasks"), ("EXPERT_NAMES", expert_names, "the names"),
                             ("TRAIN_STEPS", steps, "each expert's steps")):
    if value is not None:
      raise trainer.TrainingError(
          f"{macro}: the recipe (run.train.plan_group) sets {sets}, so {macro}={value!r} would be ignored; leave "
          f"{macro} out (choose the recipe's group with GROUP), or train your own tasks with "
          "runs/train_experts.gin instead of an experiment file")


def _train_locked(config: trainer.TrainConfig, settings: ModelSettings, source: BackboneSource,
                  placement: Placement, progress: bool):
  """`train` once its settings are checked and MODEL_DIR is this run's: loads (or initialises)
  the backbone and runs the trainer."""
  fingerprint = None
  model_config, checkpoint = settings.model_config, source.checkpoint
  if checkpoint:
    loaded = loading.load_model_checkpoint(
        checkpoint, config=model_config.replace(moe=None) if source.upcycle else model_config)
    backbone = loaded.params
    if source.upcycle:
      fingerprint = expert_files.backbone_fingerprint(backbone)
      model_config = _with_run_settings(loaded.config.replace(moe=model_config.moe), model_config)
      backbone = upcycle_params(backbone, model_config, jax.random.PRNGKey(config.seed))
    else:
      model_config = _with_run_settings(loaded.config, model_config)
    checkpoint = os.path.abspath(checkpoint)
  else:
    # Compiled: eager initialisation dispatches (and compiles) every op on its own (4 s for
    # the demo's 2-layer model, minutes for XL).
    backbone = jax.jit(lambda key: nn.unbox(init_params(model_config, key)))(jax.random.PRNGKey(config.seed))
    backbone = jax.device_get(backbone)
    checkpoint = save_random_backbone(config.model_dir, model_config, backbone, config.expert_tasks)
    print(f"note: no BACKBONE_CHECKPOINT given; training over a randomly initialised backbone, "
          f"saved to {checkpoint}", file=sys.stderr)
  config = dataclasses.replace(config, backbone_checkpoint=checkpoint)
  partitioner = None
  if placement.mesh_config is not None:
    partitioner = partitioning.Partitioner(placement.mesh_config,
                                           placement.logical_axis_rules or partitioning.DEFAULT_RULES)
  return trainer.train_experts(config, model_config, backbone, expert_config=settings.expert_config,
                               optimizer_config=settings.optimizer_config, progress=progress,
                               partitioner=partitioner, backbone_fingerprint=fingerprint)


def run_table(config: trainer.TrainConfig, settings: ModelSettings, source: BackboneSource,
              placement: Placement) -> str:
  """What a run of EXPERT_TASKS (no recipe) will train, one line per expert, then its model,
  backbone and mesh: what `elm-jax train --dry_run` prints for it."""
  model_config, optimizer_config = settings.model_config, settings.optimizer_config
  mesh_config = placement.mesh_config
  clip = "none" if optimizer_config.max_grad_norm is None else f"{optimizer_config.max_grad_norm:g}"
  lines = [f"train run: {len(config.expert_tasks)} expert(s), trained together (vmapped) for {config.steps:,} "
           "steps; --dry_run builds no model",
           "name | task | steps | batch | src/tgt | lr | schedule | dropout | optimizer | kind",
           "---|" * 10]
  for name, task in zip(config.names(), config.expert_tasks):
    lines.append(f"{name} | {task} | {config.steps:,} | {config.batch_size} | {config.input_length}/"
                 f"{config.target_length} | {optimizer_config.learning_rate:g} | {optimizer_config.schedule} | "
                 f"{model_config.dropout_rate:g} | {optimizer_config.name} (clip {clip}) | "
                 f"{settings.expert_config.kind}")
  c = model_config
  model = (f"model: T5, width {c.emb_dim}, {c.num_encoder_layers}+{c.num_decoder_layers} layers, {c.dtype} "
           f"activations, softmax over {c.softmax_vocab_size or c.vocab_size} of {c.vocab_size} logits")
  if c.moe is not None:
    model += (f"; Mixture-of-Experts{' upcycled from the dense backbone' if source.upcycle else ''}: "
              f"{c.moe.num_experts} experts in each sparse feed-forward layer (one layer in {c.moe.layer_interval})")
  lines.append(model)
  lines.append(f"backbone: {source.checkpoint}" if source.checkpoint else
               "backbone: none given (BACKBONE_CHECKPOINT): " + (
                   "an upcycled run needs the dense checkpoint" if source.upcycle else
                   f"a randomly initialised one, saved to {os.path.join(config.model_dir, 'backbone')}"))
  lines.append(f"mesh: {mesh_config} (-1: the devices the other axes leave)" if mesh_config is not None
               else "mesh: none (one device)")
  return "\n".join(lines)


def _check_mesh(mesh_config: partitioning.MeshConfig, num_experts: int, batch_size: int) -> None:
  """Refuses, before anything is loaded, experts or batch rows the mesh cannot split evenly."""
  data, experts, _ = mesh_config.resolve(jax.device_count())
  for what, size, axis, ways in (("experts", num_experts, "expert", experts),
                                 ("batch rows per expert", batch_size, "data", data)):
    if size % ways:
      raise trainer.TrainingError(
          f"MESH_CONFIG: {size} {what} cannot be split over the mesh's {axis!r} axis of {ways} devices "
          f"({jax.device_count()} devices as data={data}, expert={experts}); choose "
          f"partitioning.MeshConfig sizes that divide them (`elm-jax plan` suggests one)")


def _group_settings(first: plans.ExpertPlan, model_config: T5Config, optimizer_config: ts.OptimizerConfig
                    ) -> tuple[T5Config, ts.OptimizerConfig]:
  """The model and optimizer settings a recipe group's plans set (shared by its experts)."""
  return (model_config.replace(dropout_rate=first.dropout),
          dataclasses.replace(optimizer_config, name=first.optimizer, schedule=first.schedule,
                              warmup_steps=first.warmup_steps, max_grad_norm=first.max_grad_norm,
                              learning_rate=first.learning_rate))


@dataclasses.dataclass(frozen=True)
class StepShape:
  """One train-step program of a run: the shapes it is compiled for, and the groups that run it."""
  groups: tuple[int, ...]
  num_experts: int
  batch_size: int
  input_length: int
  target_length: int
  model_config: T5Config
  optimizer_config: ts.OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """What `elm-jax plan` needs of a run: its programs' shapes, expert and mesh settings."""
  title: str
  shapes: tuple[StepShape, ...]
  expert_config: ExpertConfig
  mesh_config: Optional[partitioning.MeshConfig]
  logical_axis_rules: Optional[Sequence]
  recipe_experts: int             # how many experts the whole recipe (or the run) trains
  from_recipe: bool = False       # shapes from a recipe (run.train.plan_group), not EXPERT_TASKS


def run_layout(plan_group: Optional[plans.PlanGroup], expert_tasks: Optional[Sequence[str]], *,
               model_config: T5Config, batch_size: int, input_length: int, target_length: int,
               expert_config: ExpertConfig, optimizer_config: ts.OptimizerConfig,
               mesh_config: Optional[partitioning.MeshConfig], logical_axis_rules: Optional[Sequence],
               all_shapes: bool = False) -> RunLayout:
  """The train-step shapes of a run: its own group's (or its EXPERT_TASKS'), or with `all_shapes`
  every distinct (experts, batch, lengths) of the group's whole recipe, with the groups that share
  it. Step counts play no part: no data is read."""
  if plan_group is None:
    if not expert_tasks:
      raise trainer.TrainingError("plan: pass EXPERT_TASKS or a recipe (run.train.plan_group)")
    shape = StepShape((0,), len(expert_tasks), batch_size, input_length, target_length, model_config,
                      optimizer_config)
    return RunLayout(f"{len(expert_tasks)} experts", (shape,), expert_config, mesh_config,
                     logical_axis_rules, len(expert_tasks))
  all_groups = plan_group.all_groups()
  if all_shapes:
    groups, indices = all_groups, range(len(all_groups))
    title = (f"the {plan_group.recipe} recipe: {sum(map(len, groups))} experts in {len(groups)} groups "
             f"of at most {plan_group.group_size}")
  else:
    groups, indices = [list(plan_group.plans)], [plan_group.index]
    title = f"group {plan_group.index} of the {plan_group.recipe or 'given'} recipe ({len(plan_group.plans)} experts)"
  shapes: dict[tuple, StepShape] = {}
  for index, group in zip(indices, groups):
    first = group[0]
    key = (len(group),) + first.shape_key()
    if key in shapes:
      shapes[key] = dataclasses.replace(shapes[key], groups=shapes[key].groups + (index,))
      continue
    model, optimizer = _group_settings(first, model_config, optimizer_config)
    shapes[key] = StepShape((index,), len(group), first.batch_size, first.input_length, first.target_length,
                            model, optimizer)
  return RunLayout(title, tuple(shapes.values()), expert_config, mesh_config, logical_axis_rules,
                   sum(map(len, all_groups)), from_recipe=True)


def _with_run_settings(checkpoint_config: T5Config, run_config: T5Config) -> T5Config:
  """The checkpoint's architecture with the run's training settings (activation dtype, dropout,
  the softmax's vocabulary), which a checkpoint's config.json does not carry for us."""
  return checkpoint_config.replace(dtype=run_config.dtype, dropout_rate=run_config.dropout_rate,
                                   softmax_vocab_size=run_config.softmax_vocab_size)


def _split_rows(plan: plans.ExpertPlan, data_dir: Optional[str]) -> Optional[plans.Rows]:
  """The train rows an inexact plan's steps follow from, read from the data: a prompt expert's
  P3 subset (or its rendered raw rows), an adapter dataset expert's prompts' (one count each), a
  full-parameter dataset expert's dataset (the largest of its templates' subsets, listed in its
  plan from the same P3 copy), a continual expert's training file (None when that file is not
  on this machine)."""
  if plan.recipe == "dataset":
    return [mixtures.train_size(p, data_dir) for p in plan.prompts]
  if plan.recipe == "prompt":
    return mixtures.train_size(plan.name, data_dir)
  if plan.recipe == "dataset_full":
    return max(mixtures.train_size(t, data_dir) for t in plan.prompts)
  if plan.recipe == "continual":
    return continual.train_split_rows(plan.name)
  return None


def recipe_table(group: plans.PlanGroup, data_dir: Optional[str] = None) -> str:
  """Every expert of the group's recipe with its group index, the group's marked."""
  groups = group.all_groups(data_dir)
  rows = [p for g in groups for p in g]
  indices = [i for i, g in enumerate(groups) for _ in g]
  follows = ("; rows as the paper's code takes them" if group.sampling_follows == "code" else
             "; rows as the paper's configs state them")
  return (f"{group.recipe} recipe: {len(rows)} experts in {len(groups)} vmapped groups of at most "
          f"{group.group_size}; this run trains group {group.index} ({len(group.plans)} experts){follows}\n"
          + plans.describe(rows, indices))


def save_random_backbone(model_dir: str, model_config: T5Config, params, expert_tasks) -> str:
  """Saves a randomly initialised backbone as a Hugging Face directory `<model_dir>/backbone`
  (with the first task's SentencePiece model), so its experts can be scored later. A backbone
  already there is kept when it is the same one, and is an error otherwise. With several
  processes, process 0 writes it while the others wait."""
  path = os.path.abspath(os.path.join(model_dir, "backbone"))
  if not partitioning.is_primary():
    partitioning.barrier("elm_jax.random_backbone")
    return path
  try:
    return _save_random_backbone(path, model_config, params, expert_tasks)
  finally:
    partitioning.barrier("elm_jax.random_backbone")


def _save_random_backbone(path: str, model_config: T5Config, params, expert_tasks) -> str:
  if os.path.isdir(path) and os.listdir(path):
    saved = hf.load_hf_checkpoint(path)
    if expert_files.backbone_fingerprint(saved.params) != expert_files.backbone_fingerprint(params):
      raise trainer.TrainingError(f"{path}: holds another backbone than this run's random one "
                                  "(other model config or seed); use another MODEL_DIR")
    return path
  vocab_path = None
  task = seqio.get_mixture_or_task(expert_tasks[0])
  vocabulary = task.output_features["targets"].vocabulary
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    vocab_path = vocabulary.sentencepiece_model_file
  hf.save_hf_checkpoint(params, model_config, path, vocab_path=vocab_path)
  return path


