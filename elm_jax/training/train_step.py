"""One compiled step that updates E experts at once over one frozen backbone.

Expert parameters and optimizer state carry a leading `expert` axis [E, ...]; the loss is
`jax.vmap`-ed over that axis with the backbone broadcast, so memory is one backbone plus E
experts. Batches are [E, batch, length]: each expert trains on its own task's examples.
Gradient clipping, the learning-rate schedule and the metrics are per expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from elm_jax.errors import UserInputError
from elm_jax.models.adapters import merge_params
from elm_jax.models.model import EncoderDecoderModel

Array = jax.Array


class OptimizerConfigError(UserInputError):
  """An optimizer setting that cannot be built."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The paper's prompt-expert recipe by default: AdamW (0.9, 0.999, eps 1e-8, no weight decay),
  lr 1e-4 decayed linearly to 0 with no warm-up, gradient norm clipped to 1.0 per expert.
  `name='adafactor'` gives t5x's default optimizer (factored second moments)."""
  name: str = "adamw"
  learning_rate: float = 1e-4
  schedule: str = "linear"  # 'linear' (to 0 at total_steps) or 'constant'
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: Optional[float] = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


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


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The per-expert optimizer (vmapped over experts by the train step)."""
  schedule = learning_rate_schedule(config, total_steps)
  if config.name == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  elif config.name == "adafactor":
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                          weight_decay_rate=config.weight_decay or None)
  else:
    raise OptimizerConfigError(f"OptimizerConfig.name: expected 'adamw' or 'adafactor', got {config.name!r}")
  if config.max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)
  return opt


@dataclasses.dataclass
class ExpertTrainState:
  """Stacked expert parameters and optimizer state ([E, ...] leaves), the step, and the
  target tokens each expert has trained on so far (`tokens_seen`, [E])."""
  step: Array
  params: Any
  opt_state: Any
  tokens_seen: Array


jax.tree_util.register_dataclass(ExpertTrainState,
                                 data_fields=["step", "params", "opt_state", "tokens_seen"],
                                 meta_fields=[])


def init_train_state(expert_params, optimizer: optax.GradientTransformation) -> ExpertTrainState:
  """expert_params with a leading [E] axis -> state with per-expert optimizer state."""
  num_experts = jax.tree_util.tree_leaves(expert_params)[0].shape[0]
  return ExpertTrainState(jnp.zeros((), jnp.int32), expert_params,
                          jax.vmap(optimizer.init)(expert_params), jnp.zeros((num_experts,), jnp.float32))


def expert_loss(expert_params, backbone, batch: dict[str, Array], model: EncoderDecoderModel,
                dropout_rng: Optional[Array] = None):
  """(loss, metrics) of one expert (its parameters merged into the frozen backbone) on its
  batch: `EncoderDecoderModel.loss`."""
  return model.loss(merge_params(backbone, expert_params), batch, dropout_rng)


def train_step(state: ExpertTrainState, backbone, batch: dict[str, Array], *, model: EncoderDecoderModel,
               optimizer: optax.GradientTransformation, dropout_rng: Optional[Array] = None
               ) -> tuple[ExpertTrainState, dict[str, Array]]:
  """Updates every expert on its own batch ([E, batch, length] leaves). Metrics are [E]: loss,
  token accuracy, tokens in this batch, gradient norm (before clipping), tokens seen so far."""
  num_experts = jax.tree_util.tree_leaves(state.params)[0].shape[0]
  rngs = None if dropout_rng is None else jax.random.split(jax.random.fold_in(dropout_rng, state.step), num_experts)

  def one(expert_params, expert_batch, rng):
    grad_fn = jax.value_and_grad(expert_loss, has_aux=True)
    (_, metrics), grads = grad_fn(expert_params, backbone, expert_batch, model, rng)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return grads, metrics

  grads, metrics = jax.vmap(one, in_axes=(0, 0, 0 if rngs is not None else None))(
      state.params, batch, rngs)
  updates, opt_state = jax.vmap(optimizer.update)(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  tokens_seen = state.tokens_seen + metrics["tokens"]
  metrics["tokens_seen"] = tokens_seen
  return ExpertTrainState(state.step + 1, params, opt_state, tokens_seen), metrics
