"""Will a recipe fit a pod? The real programs lowered on abstract arrays, measured per device.

`plan_training` lowers the trainer's own partitioned step (`trainer.step_function`) and
`plan_scoring` the one-pass scorer (`rank_scoring.expert_choice_log_likelihoods`) for a mesh of
N devices, with `jax.ShapeDtypeStruct`s in place of weights (nothing is loaded or allocated),
compiles them with XLA on N (fake) CPU devices, and reads per device:

* parameters and optimizer state: exact, from each array's shape and its shard on the mesh;
* FLOPs per step: XLA's cost analysis of the partitioned (per-device) program; remat's
  recomputation included;
* the compiled program's own memory analysis (arguments, outputs, temporaries) on XLA:CPU;
* for training, the activations saved for the backward pass, counted on the traced program
  (`saved_activation_bytes`): they are what rematerialization (`T5Config.remat_policy`) trades
  for recomputation, and they do not depend on the backend.

XLA:CPU schedules an unrolled rematerialized network without regard to memory (it runs the
recomputation early and keeps its results), so its temporary bytes do not show what remat saves
on a TPU or GPU, whose schedulers do. The training estimate is therefore built from parts that
hold on any backend: inputs and outputs of the compiled program (parameters, optimizer state,
batch; the state is not donated, so old and new are both live), the gradients of the trainable
parameters, the saved activations, and one block's working set recomputed in the backward pass.
The scorer has no backward pass; its estimate is the compiled program's own total.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from elm_jax import defaults, partitioning
from elm_jax.errors import UserInputError
from elm_jax.evaluation import rank_scoring
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import REMAT_POLICIES, T5Config
from elm_jax.training import inputs, run, trainer
from elm_jax.training import train_step as ts

GiB = 2 ** 30


class PlanError(UserInputError):
  """A recipe that does not fit the devices it was planned for, or a plan that cannot be made."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip: its memory and its peak dense FLOP/s per activation dtype. For float32, JAX's
  default matmul precision runs one bfloat16 pass on TPUs and TF32 on A100/H100 GPUs; those are
  the rates given."""
  name: str
  memory_bytes: int
  peak_flops: dict[str, float]

  def peak(self, dtype: str) -> float:
    return self.peak_flops[dtype]


ACCELERATORS = {
    "tpu_v4": Accelerator("TPU v4", 32 * GiB, {"bfloat16": 275e12, "float32": 275e12}),
    "tpu_v5e": Accelerator("TPU v5e", 16 * GiB, {"bfloat16": 197e12, "float32": 197e12}),
    "a100": Accelerator("A100 80GB", 80 * GiB, {"bfloat16": 312e12, "float32": 156e12}),
    "h100": Accelerator("H100 80GB SXM", 80 * GiB, {"bfloat16": 989e12, "float32": 495e12}),
}


@dataclasses.dataclass
class ProgramPlan:
  """What one program needs per device (bytes; FLOPs per call)."""
  name: str
  shape: str                        # the problem, in words
  parameters: int                   # backbone + experts held on the device
  expert_parameters: int            # of which the experts'
  optimizer_state: int
  batch: int
  compiled_arguments: int           # XLA's memory analysis of the compiled (XLA:CPU) program
  compiled_outputs: int
  compiled_aliased: int
  compiled_temp: int
  flops: float
  compile_seconds: float
  gradients: int = 0
  saved_activations: Optional[int] = None
  block_working_set: int = 0
  estimate: int = 0
  method: str = ""
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def compiled_total(self) -> int:
    return self.compiled_arguments + self.compiled_outputs - self.compiled_aliased + self.compiled_temp


# ---------------------------------------------------------------------------- helpers
def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of one device's shard of every array of `tree` (ShapeDtypeStructs or arrays)."""
  leaves = jax.tree_util.tree_leaves(tree)
  sharding_leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  if len(leaves) != len(sharding_leaves):
    raise ValueError(f"shard_bytes: {len(leaves)} arrays but {len(sharding_leaves)} shardings")
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, sharding_leaves))


def tree_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def saved_activation_bytes(fn, params, *others) -> int:
  """Bytes that the forward pass of `fn(params, *others)` keeps for its gradient with respect
  to `params` (the vjp's residuals), leaving out what is already an input (weights, the
  batch). Traced, not compiled: the same on every backend; rematerialization policies change it."""
  def forward(params, *others):
    _, pullback = jax.vjp(lambda p: fn(p, *others), params)
    return pullback
  closed = jax.make_jaxpr(forward)(params, *others)
  inputs_ = {id(v) for v in closed.jaxpr.invars}
  seen, total = set(), 0
  for v in closed.jaxpr.outvars:
    if isinstance(v, jax.extend.core.Literal) or id(v) in inputs_ or id(v) in seen:
      continue
    seen.add(id(v))
    aval = v.aval
    if hasattr(aval, "shape"):
      total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
  return total


def _struct(x, sharding=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(_struct, tree, shardings)


def _stacked(expert: Any, num_experts: int) -> Any:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((num_experts,) + x.shape, x.dtype), expert)


def _batch(num_experts: int, batch_size: int, input_length: int, target_length: int) -> dict:
  """The trainer's batch ([E, batch, length] int32 per feature), abstract."""
  return {k: jax.ShapeDtypeStruct((num_experts, batch_size, input_length if k == "encoder_input_tokens"
                                   else target_length), jnp.int32) for k in inputs.FEATURES}


def _compile(lowered_fn) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = lowered_fn().compile()
  return compiled, time.perf_counter() - start


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def _mesh_words(partitioner: partitioning.Partitioner) -> str:
  return " x ".join(f"{n} {a}" for a, n in partitioner.mesh.shape.items())


# ---------------------------------------------------------------------------- training
def plan_training(model_config: T5Config, expert_config: ExpertConfig, optimizer_config: ts.OptimizerConfig,
                  partitioner: partitioning.Partitioner, *, num_experts: int, batch_size: int,
                  input_length: int, target_length: int, seed: int = 0) -> ProgramPlan:
  """The trainer's partitioned step for `num_experts` experts of `batch_size` rows each."""
  mesh = partitioner.mesh.shape
  _check_divisible("the group's experts", num_experts, "expert", mesh["expert"],
                   "GROUP_SIZE (or partitioning.MeshConfig.expert)")
  _check_divisible("each expert's batch", batch_size, "data", mesh["data"],
                   "partitioning.MeshConfig.data (or the recipe's batch size)")
  model = EncoderDecoderModel.build(model_config, expert_config)
  optimizer = ts.make_optimizer(optimizer_config)
  frozen, expert = model.abstract_params()
  state = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), _stacked(expert, num_experts))
  plans = jax.eval_shape(lambda: ts.ExpertSchedules.build([1] * num_experts, [1.0] * num_experts,
                                                      seeds=range(num_experts)))
  noisy = model_config.dropout_rate > 0 or (model_config.moe is not None and model_config.moe.router_jitter > 0)
  rng = jax.random.PRNGKey(seed) if noisy else None
  step_fn, specs = trainer.step_function(model, optimizer, rng, state, plans, partitioner)
  state_specs, backbone_specs, batch_specs, plan_specs = specs
  batch = _batch(num_experts, batch_size, input_length, target_length)
  shardings = [partitioner.shardings(s) for s in specs]
  args = [_with_shardings(tree, sh) for tree, sh in zip((state, frozen, batch, plans), shardings)]
  compiled, seconds = _compile(lambda: step_fn.lower(*args))
  memory = compiled.memory_analysis()
  experts_here = num_experts // mesh["expert"]
  rows_here = batch_size // mesh["data"]
  plan = ProgramPlan(
      name="train step",
      shape=(f"{num_experts} experts x batch {batch_size} x {input_length}/{target_length} tokens on "
             f"{_mesh_words(partitioner)}: {experts_here} expert(s) x {rows_here} row(s) per device"),
      parameters=shard_bytes(frozen, shardings[1]) + shard_bytes(state.params, shardings[0].params),
      expert_parameters=shard_bytes(state.params, shardings[0].params),
      optimizer_state=shard_bytes(state.opt_state, shardings[0].opt_state),
      batch=shard_bytes(batch, shardings[2]),
      compiled_arguments=memory.argument_size_in_bytes, compiled_outputs=memory.output_size_in_bytes,
      compiled_aliased=memory.alias_size_in_bytes, compiled_temp=memory.temp_size_in_bytes,
      flops=_flops(compiled), compile_seconds=seconds,
      gradients=shard_bytes(state.params, shardings[0].params))
  plan.saved_activations = training_activation_bytes(model_config, expert_config, experts_here, rows_here,
                                                     input_length, target_length, noisy)
  plan.block_working_set = _block_working_set(model_config, expert_config, experts_here, rows_here,
                                              input_length, target_length, noisy)
  plan.estimate = (plan.compiled_arguments + plan.compiled_outputs - plan.compiled_aliased + plan.gradients
                   + plan.saved_activations + plan.block_working_set)
  plan.method = ("arguments + outputs (XLA memory analysis) + gradients + activations saved for the "
                 "backward pass (traced) + one block recomputed")
  if mesh["model"] > 1:
    plan.notes.append("activations are counted whole on every device (an upper bound: the model "
                      "axis splits some of them)")
  return plan


def training_activation_bytes(model_config: T5Config, expert_config: ExpertConfig, num_experts: int,
                              batch_size: int, input_length: int, target_length: int,
                              noisy: bool = True) -> int:
  """Activations the vmapped loss of `num_experts` experts on `batch_size` rows each keeps for
  the backward pass, under `model_config.remat_policy`."""
  model = EncoderDecoderModel.build(model_config, expert_config)
  frozen, expert = model.abstract_params()
  batch = _batch(num_experts, batch_size, input_length, target_length)
  rngs = jax.ShapeDtypeStruct((num_experts, 2), jnp.uint32) if noisy else None

  def loss(stacked, frozen, batch, rngs):
    return model.expert_losses(frozen, stacked, batch, rngs)[0].sum()  # as the train step differentiates it
  return saved_activation_bytes(loss, _stacked(expert, num_experts), frozen, batch, rngs)


def _block_working_set(model_config: T5Config, expert_config: ExpertConfig, num_experts: int,
                       batch_size: int, input_length: int, target_length: int, noisy: bool) -> int:
  """What recomputing one block for its backward pass holds at once: the saved activations of
  the un-rematerialized network divided by its blocks (0 without remat: nothing is recomputed)."""
  if model_config.remat_policy == "none":
    return 0
  full = training_activation_bytes(model_config.replace(remat_policy="none"), expert_config, num_experts,
                                   batch_size, input_length, target_length, noisy)
  return full // (model_config.num_encoder_layers + model_config.num_decoder_layers)


# ---------------------------------------------------------------------------- scoring
def plan_scoring(model_config: T5Config, expert_config: ExpertConfig, partitioner: partitioning.Partitioner, *,
                 num_experts: int, batch_size: int, input_length: int, target_length: int,
                 choices: int = rank_scoring.MAX_CHOICES_PER_ROW) -> ProgramPlan:
  """The one-pass scorer: `num_experts` experts (one expert chunk) on one batch of `batch_size`
  rows of `choices` answer choices each, as `RankScorer` runs it with this partitioner."""
  mesh = partitioner.mesh.shape
  _check_divisible("the scored expert chunk", num_experts, "expert", mesh["expert"], "--expert_chunk")
  model = EncoderDecoderModel.build(model_config, expert_config)
  frozen, expert = model.abstract_params()
  experts = _stacked(expert, num_experts)
  backbone_specs, expert_specs = model.expert_specs()
  backbone_sh, experts_sh = partitioner.shardings(backbone_specs), partitioner.shardings(expert_specs)
  replicated = NamedSharding(partitioner.mesh, PartitionSpec())
  tokens = jax.ShapeDtypeStruct((batch_size, input_length), jnp.int32, sharding=replicated)
  targets = jax.ShapeDtypeStruct((batch_size, choices, target_length), jnp.int32, sharding=replicated)
  args = (_with_shardings(frozen, backbone_sh), _with_shardings(experts, experts_sh), tokens, targets)

  def lower():
    with partitioner.context():
      return rank_scoring.expert_choice_log_likelihoods.lower(model, *args)
  compiled, seconds = _compile(lower)
  memory = compiled.memory_analysis()
  plan = ProgramPlan(
      name="scorer",
      shape=(f"{num_experts} experts x batch {batch_size} x {choices} choices x "
             f"{input_length}/{target_length} tokens on {_mesh_words(partitioner)}: "
             f"{num_experts // mesh['expert']} expert(s) per device"),
      parameters=shard_bytes(frozen, backbone_sh) + shard_bytes(experts, experts_sh),
      expert_parameters=shard_bytes(experts, experts_sh), optimizer_state=0,
      batch=tree_bytes((tokens, targets)),
      compiled_arguments=memory.argument_size_in_bytes, compiled_outputs=memory.output_size_in_bytes,
      compiled_aliased=memory.alias_size_in_bytes, compiled_temp=memory.temp_size_in_bytes,
      flops=_flops(compiled), compile_seconds=seconds)
  plan.estimate = plan.compiled_total
  plan.method = "XLA memory analysis of the compiled program (arguments + outputs + temporaries)"
  return plan


def _check_divisible(what: str, size: int, axis: str, ways: int, change: str) -> None:
  if size % ways:
    raise PlanError(f"{what} ({size}) cannot be split over the mesh's {axis!r} axis of {ways} devices; "
                    f"change {change} so that {ways} divides it")


# ---------------------------------------------------------------------------- the verdict
def _gib(n: float) -> str:
  """A byte count in GiB (MiB below one GiB)."""
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2 ** 20:.1f} MiB"


def describe(plan: ProgramPlan, accelerator: Optional[Accelerator] = None, dtype: str = "float32",
             peak_flops: Optional[float] = None) -> str:
  """A per-device table of `plan`, with the step time the peak FLOP/s implies."""
  rows = [f"{plan.name}: {plan.shape}",
          f"  parameters           {_gib(plan.parameters):>12}   (backbone + experts on the device)",
          f"  optimizer state      {_gib(plan.optimizer_state):>12}",
          f"  batch                {_gib(plan.batch):>12}"]
  if plan.saved_activations is not None:
    rows += [f"  gradients            {_gib(plan.gradients):>12}",
             f"  saved activations    {_gib(plan.saved_activations):>12}   (kept for the backward pass; traced)"]
    if plan.block_working_set:
      rows.append(f"  one block recomputed {_gib(plan.block_working_set):>12}")
  rows += [f"  XLA:CPU compiled     args {_gib(plan.compiled_arguments)}, outputs {_gib(plan.compiled_outputs)} "
           f"(aliased {_gib(plan.compiled_aliased)}), temporaries {_gib(plan.compiled_temp)}",
           f"  estimate per device  {_gib(plan.estimate):>12}   = {plan.method}",
           f"  FLOPs per device     {plan.flops:.3e} per call (compiled in {plan.compile_seconds:.0f} s)"]
  peak = peak_flops or (accelerator.peak(dtype) if accelerator is not None else None)
  if peak:
    rows.append(f"  step time            >= {plan.flops / peak * 1e3:.3g} ms at {peak / 1e12:.0f} TFLOP/s "
                "(all of the peak; divide by the utilisation you expect)")
  if accelerator is not None:
    share = plan.estimate / accelerator.memory_bytes
    rows.append(f"  on {accelerator.name} ({_gib(accelerator.memory_bytes)}): {share:.0%} of memory"
                + ("" if share <= 1 else " -- DOES NOT FIT"))
  rows += [f"  note: {n}" for n in plan.notes]
  return "\n".join(rows)


def suggestions(plan: ProgramPlan, accelerator: Accelerator, *, model_config: T5Config,
                expert_config: ExpertConfig, partitioner: partitioning.Partitioner, num_experts: int,
                batch_size: int, input_length: int, target_length: int) -> list[str]:
  """What would make a plan that does not fit `accelerator` fit, each with its figure."""
  mesh = partitioner.mesh.shape
  memory = accelerator.memory_bytes
  out = []
  experts_here = num_experts // mesh["expert"]
  backbone_bytes = plan.parameters - plan.expert_parameters
  per_expert = (plan.estimate - backbone_bytes) / max(experts_here, 1)  # what scales with experts
  if plan.saved_activations is not None:  # a train step
    noisy = model_config.dropout_rate > 0
    rows = batch_size // mesh["data"]
    later = REMAT_POLICIES[REMAT_POLICIES.index(model_config.remat_policy) + 1:]
    for policy in later:
      config = model_config.replace(remat_policy=policy)
      saved = training_activation_bytes(config, expert_config, experts_here, rows, input_length,
                                        target_length, noisy)
      work = _block_working_set(config, expert_config, experts_here, rows, input_length, target_length, noisy)
      estimate = plan.estimate - plan.saved_activations - plan.block_working_set + saved + work
      out.append(f"rematerialization: T5Config.remat_policy = '{policy}' (saved activations "
                 f"{_gib(plan.saved_activations)} -> {_gib(saved)}; estimate {_gib(estimate)}"
                 f"{', fits' if estimate <= memory else ', still too large'})")
    if experts_here > 1:
      fit = max((k for k in range(1, experts_here) if experts_here % k == 0
                 and backbone_bytes + per_expert * k <= memory), default=None)
      if fit is not None:
        out.append(f"more expert shards: partitioning.MeshConfig.expert = {mesh['expert'] * experts_here // fit} "
                   f"({fit} expert(s) per device, about {_gib(backbone_bytes + per_expert * fit)})")
        out.append(f"a smaller group: GROUP_SIZE = {mesh['expert'] * fit} on this mesh")
  else:
    fit = max((k for k in range(mesh["expert"], num_experts, mesh["expert"])
               if backbone_bytes + per_expert * (k // mesh["expert"]) <= memory), default=None)
    if fit is not None:
      out.append(f"score fewer experts at once: --expert_chunk={fit} (about "
                 f"{_gib(backbone_bytes + per_expert * (fit // mesh['expert']))})")
    out.append("a smaller scoring batch: --batch_size (activations scale with it)")
  if mesh["model"] == 1 and backbone_bytes > memory / 4:
    out.append(f"split the backbone over a model axis: partitioning.MeshConfig.model = 2 or more "
               f"(its {_gib(backbone_bytes)} per device halve with each doubling)")
  return out




def layouts(num_experts: int, batch_size: int, num_devices: int, model: int = 1) -> list[tuple[int, int]]:
  """(data, expert) meshes of `num_devices` / `model` devices on which `num_experts` experts of
  `batch_size` rows split evenly, most expert shards first."""
  ways = num_devices // model if num_devices % model == 0 else 0
  return [(ways // e, e) for e in range(ways, 0, -1)
          if ways % e == 0 and num_experts % e == 0 and batch_size % (ways // e) == 0]


def _layout_advice(num_experts: int, batch_size: int, num_devices: int, model: int) -> str:
  fits = layouts(num_experts, batch_size, num_devices, model)
  if fits:
    data, expert = fits[0]
    return (f"a mesh that splits it: partitioning.MeshConfig.data = {data}, expert = {expert}"
            + (f", model = {model}" if model > 1 else ""))
  best = max(((d * e, d, e) for e in range(1, num_experts + 1) if num_experts % e == 0
              for d in range(1, batch_size + 1) if batch_size % d == 0 and d * e * model <= num_devices))
  return (f"no mesh of all {num_devices} devices splits {num_experts} experts x batch {batch_size}; run this "
          f"group on a slice of {best[0] * model} devices (MeshConfig.data = {best[1]}, expert = {best[2]}"
          + (f", model = {model}" if model > 1 else "") + ") or change GROUP_SIZE")


@dataclasses.dataclass(frozen=True)
class PlanRequest:
  """What `plan_run` plans against: the chip (or a memory size and peak of one's own), and the
  scoring pass to plan beside training (None: the whole recipe's experts in one chunk, as
  `RankScorer` runs on accelerators)."""
  accelerator: Accelerator = ACCELERATORS["tpu_v4"]
  memory_bytes: Optional[int] = None
  peak_flops: Optional[float] = None
  score: bool = True
  score_experts: Optional[int] = None
  score_batch_size: int = defaults.BATCH_SIZE
  score_choices: int = 4
  score_input_length: int = defaults.MAX_INPUT_LENGTH
  score_target_length: int = defaults.MAX_TARGET_LENGTH

  @property
  def chip(self) -> Accelerator:
    if self.memory_bytes is None:
      return self.accelerator
    return dataclasses.replace(self.accelerator, name=f"{self.accelerator.name}-like chip",
                               memory_bytes=self.memory_bytes)


# ---------------------------------------------------------------------------- extents
# XLA refuses an array of 2^63 bytes or more by aborting the whole process ("overflow in static
# extent product"), and JAX indexes positions along an axis with 32-bit integers.
MAX_ARRAY_BYTES = 2 ** 63 - 1
MAX_EXTENT = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class Extent:
  """One axis of an array a program builds: its size, and the flag or binding that sets it (None:
  the model's own)."""
  name: str
  size: int
  flag: Optional[str] = None


def _program_arrays(model_config: T5Config, program: str, experts: Extent, batch: Extent, inputs_: Extent,
                    targets: Extent, choices: Optional[Extent] = None) -> list[tuple[str, list[Extent]]]:
  """The largest arrays of a train step or the scorer, float32 and unsharded (an upper bound):
  attention logits, feed-forward activations, output logits."""
  heads = Extent("heads", model_config.num_heads)
  width = Extent("width", max(model_config.mlp_dim, model_config.emb_dim,
                              model_config.num_heads * model_config.head_dim))
  vocab = Extent("vocab", model_config.vocab_size)
  rows = [experts, batch] + ([choices] if choices is not None else [])
  return [(f"{program}'s encoder attention", [experts, batch, heads, inputs_, inputs_]),
          (f"{program}'s encoder activations", [experts, batch, inputs_, width]),
          (f"{program}'s decoder self-attention", [*rows, heads, targets, targets]),
          (f"{program}'s decoder cross-attention", [*rows, heads, targets, inputs_]),
          (f"{program}'s decoder activations", [*rows, targets, width]),
          (f"{program}'s logits", [*rows, targets, vocab])]


def check_extents(arrays: Sequence[tuple[str, Sequence[Extent]]]) -> None:
  """Raises PlanError, before anything is traced, when an array of `arrays` ((what, axes)
  pairs) has an axis longer than MAX_EXTENT or would take more than MAX_ARRAY_BYTES: naming the
  flag that sets its longest axis, and the most that flag can be."""
  for what, axes in arrays:
    for axis in axes:
      if axis.flag is not None and axis.size > MAX_EXTENT:
        raise PlanError(f"{axis.flag}={axis.size}: expected at most {MAX_EXTENT} (JAX indexes the {axis.name} "
                        "axis with 32-bit integers)")
    size = 4 * math.prod(a.size for a in axes)
    if size <= MAX_ARRAY_BYTES:
      continue
    culprit = max((a for a in axes if a.flag is not None), key=lambda a: a.size, default=None)
    shape = " x ".join(f"{a.name} {a.size}" for a in axes)
    if culprit is None:
      raise PlanError(f"the {what} [{shape}] would take {size:.3g} bytes, more than XLA can address (2^63)")
    limit = min(_largest(culprit, axes) for _, axes in arrays if culprit in axes)
    raise PlanError(f"{culprit.flag}={culprit.size}: the {what} [{shape}] would take {size:.3g} bytes, more "
                    f"than XLA can address (2^63); expected at most {max(limit, 1)}")


def _largest(axis: Extent, axes: Sequence[Extent]) -> int:
  """The largest size of `axis` (wherever it appears in `axes`) that keeps the array within
  MAX_ARRAY_BYTES."""
  count = sum(1 for a in axes if a == axis)
  room = MAX_ARRAY_BYTES // (4 * math.prod(a.size for a in axes if a != axis))
  largest = room if count == 1 else math.isqrt(room) if count == 2 else int(room ** (1 / count))
  return min(MAX_EXTENT, largest)


def run_arrays(layout: run.RunLayout, request: "PlanRequest", score_experts: int) -> list:
  """`_program_arrays` of every train step of `layout` and of its scoring pass."""
  out = []
  for shape in layout.shapes:
    # A recipe's batch sizes and lengths are the paper's; only its group size is the user's.
    binding = (lambda name: None) if layout.from_recipe else (lambda name: name)  # noqa: E731
    out += _program_arrays(
        shape.model_config, "train step",
        Extent("experts", shape.num_experts, "GROUP_SIZE" if layout.from_recipe else "len(EXPERT_TASKS)"),
        Extent("batch", shape.batch_size, binding("BATCH_SIZE")),
        Extent("input", shape.input_length, binding("INPUT_LENGTH")),
        Extent("target", shape.target_length, binding("TARGET_LENGTH")))
  if request.score:
    out += _program_arrays(
        layout.shapes[0].model_config, "scorer", Extent("experts", score_experts, "--score_experts"),
        Extent("batch", request.score_batch_size, "--score_batch_size"),
        Extent("input", request.score_input_length, "--score_input_length"),
        Extent("target", request.score_target_length, "--score_target_length"),
        Extent("choices", request.score_choices, "--score_choices"))
  return out


def plan_run(layout: run.RunLayout, request: PlanRequest = PlanRequest(), stream=None) -> list[ProgramPlan]:
  """Plans every train-step shape of `layout` (and the scoring pass of its experts) on this
  process's devices, prints each program's figures to `stream` (stdout), and raises PlanError
  naming every program that does not fit the chip, or cannot be split over the mesh, and what
  to change. Returns the plans."""
  stream = stream or sys.stdout
  devices = jax.device_count()
  partitioner = partitioning.Partitioner(layout.mesh_config or partitioning.MeshConfig(),
                                         layout.logical_axis_rules or partitioning.DEFAULT_RULES)
  mesh = partitioner.mesh.shape
  score_experts = request.score_experts or -(-layout.recipe_experts // mesh["expert"]) * mesh["expert"]
  check_extents(run_arrays(layout, request, score_experts))
  chip = request.chip
  print(f"elm-jax plan: {layout.title}; {devices} devices as {_mesh_words(partitioner)}; per device "
        f"of a {chip.name} ({_gib(chip.memory_bytes)})", file=stream)
  made, problems, advice = [], [], {}
  for shape in layout.shapes:
    where = f"train step of group(s) {_groups_words(shape.groups)}"
    config = shape.model_config
    try:
      plan = plan_training(config, layout.expert_config, shape.optimizer_config, partitioner,
                           num_experts=shape.num_experts, batch_size=shape.batch_size,
                           input_length=shape.input_length, target_length=shape.target_length)
    except PlanError as e:
      problems.append(f"{where}: {e}; or {_layout_advice(shape.num_experts, shape.batch_size, devices, mesh['model'])}")
      print(f"\n{where}: {shape.num_experts} experts x batch {shape.batch_size} x "
            f"{shape.input_length}/{shape.target_length} tokens: cannot be split over this mesh", file=stream)
      continue
    plan.name = where
    print("\n" + describe(plan, chip, config.dtype, request.peak_flops), file=stream)
    made.append(plan)
    advice[plan.name] = suggestions(plan, chip, model_config=config, expert_config=layout.expert_config,
                                    partitioner=partitioner, num_experts=shape.num_experts,
                                    batch_size=shape.batch_size, input_length=shape.input_length,
                                    target_length=shape.target_length)
  if request.score:
    experts = score_experts
    config = layout.shapes[0].model_config.replace(dropout_rate=0.0)
    try:
      plan = plan_scoring(config, layout.expert_config, partitioner, num_experts=experts,
                          batch_size=request.score_batch_size, input_length=request.score_input_length,
                          target_length=request.score_target_length, choices=request.score_choices)
    except PlanError as e:
      problems.append(f"scorer: {e}")
    else:
      print("\n" + describe(plan, chip, config.dtype, request.peak_flops), file=stream)
      made.append(plan)
      advice[plan.name] = suggestions(plan, chip, model_config=config, expert_config=layout.expert_config,
                                      partitioner=partitioner, num_experts=experts,
                                      batch_size=request.score_batch_size,
                                      input_length=request.score_input_length,
                                      target_length=request.score_target_length)
  over = [p for p in made if p.estimate > chip.memory_bytes]
  if problems or over:
    lines = [f"{len(problems) + len(over)} program(s) of this run do not fit {devices} x {chip.name}:"]
    lines += [f"- {p}" for p in problems]
    for p in over:
      lines.append(f"- {p.name} needs about {_gib(p.estimate)} per device, more than the "
                   f"{_gib(chip.memory_bytes)} of a {chip.name}; change one of:")
      lines += [f"    - {s}" for s in advice.get(p.name, [])] or ["    - a larger accelerator or more devices"]
    raise PlanError("\n".join(lines))
  print(f"\nfits: every program above fits a {chip.name} ({_gib(chip.memory_bytes)} per device)", file=stream)
  return made


def _groups_words(groups: Sequence[int]) -> str:
  if len(groups) > 6:
    return f"{', '.join(map(str, groups[:5]))}, ... ({len(groups)} groups)"
  return ", ".join(map(str, groups))
