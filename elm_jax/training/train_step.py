"""One compiled step that updates E experts at once over one frozen backbone.

Expert parameters and optimizer state carry a leading `expert` axis [E, ...]; the model computes
every expert's loss over the one backbone (`EncoderDecoderModel.expert_losses`), so memory is one
backbone plus E experts, and the gradient of their sum is each expert's own gradient. Batches
are [E, batch, length]: each expert trains on its own task's examples.
Gradient clipping, the learning-rate schedule and the metrics are per expert.

Experts of one program may follow different schedules (`ExpertSchedules`): each has its own number of
steps, peak learning rate and dropout seed. An expert that has taken its steps stops changing:
its parameters and optimizer state stay bit for bit as after its last step while the others go
on, so a group of experts ends exactly where each expert trained alone would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from elm_jax import expert_stack
from elm_jax.errors import UserInputError
from elm_jax.models.model import EncoderDecoderModel

Array = jax.Array


class OptimizerConfigError(UserInputError):
  """An optimizer setting that cannot be built."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The paper's prompt-expert recipe by default: AdamW (0.9, 0.999, eps 1e-8, no weight decay),
  lr 1e-4 decayed linearly to 0 with no warm-up, gradient norm clipped to 1.0 per expert.
  `name='adafactor'` gives t5x's default optimizer (factored second moments), its update scaled
  by each parameter's RMS (floor 1e-3) when `multiply_by_parameter_scale`, as Mesh TensorFlow's
  AdafactorOptimizer does by default (T0's runs)."""
  name: str = "adamw"
  learning_rate: float = 1e-4
  schedule: str = "linear"  # 'linear' (to 0 at total_steps) or 'constant'
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: Optional[float] = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  multiply_by_parameter_scale: bool = False  # adafactor only


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  if config.schedule not in ("linear", "constant"):
    raise OptimizerConfigError(f"OptimizerConfig.schedule: expected 'linear' or 'constant', "
                               f"got {config.schedule!r}")
  if config.schedule == "constant":
    decay = optax.constant_schedule(config.learning_rate)
  else:
    decay = optax.linear_schedule(config.learning_rate, 0.0, max(1, total_steps - config.warmup_steps))
  if config.warmup_steps:
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])
  return decay


def make_optimizer(config: OptimizerConfig, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """The per-expert optimizer (vmapped over experts by the train step). With `total_steps` it
  applies `config`'s schedule itself; without, it steps with a learning rate of 1 and the train
  step scales each expert's update by its own schedule (`ExpertSchedules`)."""
  schedule = 1.0 if total_steps is None else learning_rate_schedule(config, total_steps)
  if config.name == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  elif config.name == "adafactor":
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=config.multiply_by_parameter_scale,
                          weight_decay_rate=config.weight_decay or None)
  else:
    raise OptimizerConfigError(f"OptimizerConfig.name: expected 'adamw' or 'adafactor', got {config.name!r}")
  if config.max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)
  return opt


@dataclasses.dataclass
class ExpertTrainState:
  """Stacked expert parameters and optimizer state ([E, ...] leaves), the step of the group,
  the steps each expert has taken (`expert_steps`, [E]) and the target tokens each expert has
  trained on so far (`tokens_seen`, [E])."""
  step: Array
  params: Any
  opt_state: Any
  tokens_seen: Array
  expert_steps: Array


jax.tree_util.register_dataclass(ExpertTrainState,
                                 data_fields=["step", "params", "opt_state", "tokens_seen", "expert_steps"],
                                 meta_fields=[])


def init_train_state(expert_params, optimizer: optax.GradientTransformation) -> ExpertTrainState:
  """expert_params with a leading [E] axis -> state with per-expert optimizer state."""
  num_experts = jax.tree_util.tree_leaves(expert_params)[0].shape[0]
  return ExpertTrainState(jnp.zeros((), jnp.int32), expert_params,
                          jax.vmap(optimizer.init)(expert_params), jnp.zeros((num_experts,), jnp.float32),
                          jnp.zeros((num_experts,), jnp.int32))


def state_specs(expert_specs, opt_state) -> ExpertTrainState:
  """Logical specs of a train state: the stacked experts' (`EncoderDecoderModel.expert_specs`), the
  optimizer state's leading expert axis, per-expert counters on `expert`, the step replicated."""
  return ExpertTrainState(PartitionSpec(), expert_specs, expert_stack.leading_axis_specs(opt_state),
                          PartitionSpec("expert"), PartitionSpec("expert"))


@dataclasses.dataclass
class ExpertSchedules:
  """Each expert's own schedule, [E] arrays: steps to take, peak learning rate, warm-up steps,
  whether the rate stays constant (else it decays linearly to 0 at `total_steps`), and the
  seed of its dropout masks (drawn from its own seed and step, so they do not depend on which
  experts share its program)."""
  total_steps: Array
  learning_rate: Array
  warmup_steps: Array
  constant: Array
  seed: Array

  @classmethod
  def build(cls, total_steps, learning_rates, warmup_steps: int = 0, constant: bool = False,
            seeds=None) -> "ExpertSchedules":
    e = len(total_steps)
    seeds = range(e) if seeds is None else seeds
    return cls(jnp.asarray(total_steps, jnp.int32), jnp.asarray(learning_rates, jnp.float32),
               jnp.full((e,), warmup_steps, jnp.int32), jnp.full((e,), constant, jnp.bool_),
               jnp.asarray(list(seeds), jnp.uint32))

  @classmethod
  def from_config(cls, config: OptimizerConfig, total_steps, learning_rates=None, seeds=None) -> "ExpertSchedules":
    """Plans that follow `config`'s schedule kind and warm-up, with per-expert steps and rates
    (default: config.learning_rate for every expert)."""
    if config.schedule not in ("linear", "constant"):
      raise OptimizerConfigError(f"OptimizerConfig.schedule: expected 'linear' or 'constant', "
                                 f"got {config.schedule!r}")
    rates = learning_rates if learning_rates is not None else [config.learning_rate] * len(total_steps)
    return cls.build(total_steps, rates, config.warmup_steps, config.schedule == "constant", seeds)


jax.tree_util.register_dataclass(ExpertSchedules, data_fields=["total_steps", "learning_rate", "warmup_steps",
                                                           "constant", "seed"], meta_fields=[])


def planned_learning_rate(step: Array, total_steps: Array, peak: Array, warmup: Array, constant: Array) -> Array:
  """The learning rate of an expert at its own `step`: linear warm-up to `peak` over `warmup`
  steps, then constant or linear decay to 0 at `total_steps` (optax's linear and joined
  schedules, per expert)."""
  step = step.astype(jnp.float32)
  warm = peak * step / jnp.maximum(warmup, 1).astype(jnp.float32)
  frac = jnp.clip((step - warmup) / jnp.maximum(total_steps - warmup, 1).astype(jnp.float32), 0.0, 1.0)
  after = jnp.where(constant, peak, peak + (0.0 - peak) * frac)
  return jnp.where(step < warmup, warm, after)


def train_step(state: ExpertTrainState, backbone, batch: dict[str, Array], *, model: EncoderDecoderModel,
               optimizer: optax.GradientTransformation, dropout_rng: Optional[Array] = None,
               plans: Optional[ExpertSchedules] = None) -> tuple[ExpertTrainState, dict[str, Array]]:
  """Updates every expert on its own batch ([E, batch, length] leaves). Metrics are [E]: loss,
  token accuracy, tokens in this batch, gradient norm (before clipping), tokens seen so far,
  the learning rate used and whether the expert stepped (`active`).

  Without `plans` every expert steps and `optimizer` carries the schedule. With `plans`,
  `optimizer` steps at rate 1 (`make_optimizer(config)`), each expert's update is scaled by its
  own rate, and an expert whose `expert_steps` has reached its `total_steps` keeps its
  parameters and optimizer state unchanged."""
  num_experts = jax.tree_util.tree_leaves(state.params)[0].shape[0]
  if dropout_rng is None:
    rngs = None
  elif plans is None:
    rngs = jax.random.split(jax.random.fold_in(dropout_rng, state.step), num_experts)
  else:
    rngs = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.fold_in(dropout_rng, seed), step))(
        plans.seed, state.expert_steps)

  def total_loss(params):
    losses, metrics = model.expert_losses(backbone, params, batch, rngs)
    return losses.sum(), metrics  # experts are independent: its gradient is each expert's own

  (_, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
  metrics["grad_norm"] = jax.vmap(optax.tree.norm)(grads)
  updates, opt_state = jax.vmap(optimizer.update)(grads, state.opt_state, state.params)
  if plans is None:
    params = optax.apply_updates(state.params, updates)
    active = jnp.ones((num_experts,), jnp.bool_)
  else:
    rate = jax.vmap(planned_learning_rate)(state.expert_steps, plans.total_steps, plans.learning_rate,
                                           plans.warmup_steps, plans.constant)
    per_expert = lambda x, v: v.reshape((num_experts,) + (1,) * (x.ndim - 1))  # noqa: E731
    updates = jax.tree_util.tree_map(lambda u: u * per_expert(u, rate).astype(u.dtype), updates)
    active = state.expert_steps < plans.total_steps
    keep = lambda new, old: jnp.where(per_expert(old, active), new, old)  # noqa: E731
    params = jax.tree_util.tree_map(keep, optax.apply_updates(state.params, updates), state.params)
    opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics["learning_rate"] = rate
  tokens_seen = state.tokens_seen + metrics["tokens"] * active
  metrics["tokens_seen"] = tokens_seen
  metrics["active"] = active.astype(jnp.float32)
  return ExpertTrainState(state.step + 1, params, opt_state, tokens_seen,
                          state.expert_steps + active.astype(jnp.int32)), metrics
