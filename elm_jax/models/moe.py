"""Sparse Mixture-of-Experts feed-forward: Switch (top-1), GShard (top-2) and expert choice.

Tokens are cut into groups (`token_groups`); within a group a router scores every expert, each
expert takes at most `capacity` tokens, and the layer runs all experts batched over a leading
expert axis. Routing is expressed as dense `dispatch_mask` / `combine_weights` tensors of shape
[groups, group_size, experts, capacity], so that XLA turns the two einsums into all-to-alls when
the expert axis (`moe_expert`) and the group axis (`moe_group`) are sharded.

A token no expert takes contributes exactly zero, so the T5 block's residual carries it through.
The auxiliary losses (Switch load balancing, ST-MoE router z-loss) and routing metrics are sown
into the `intermediates` collection; `router_losses_and_metrics` collects them from a model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from elm_jax.errors import UserInputError
from elm_jax.models import layers

Array = jax.Array
ROUTERS = ("top_k", "expert_choice")
LOSS_NAMES = ("load_balancing_loss", "router_z_loss")

expert_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
router_kernel_init = nn.initializers.normal(2e-2)


class MoeConfigError(UserInputError):
  """A Mixture-of-Experts configuration, or input, the layer cannot route."""


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Where the sparse layers go and how tokens are routed to experts.

  Layer i (0-based) of a stack is sparse when `(i + 1) % layer_interval == 0`. `router`:
  'top_k' (each token picks `num_selected_experts` experts: 1 is Switch, 2 is GShard) or
  'expert_choice' (each expert picks its `capacity` tokens). `expert_mlp_dim` None means the
  dense model's mlp_dim. `normalize_gates` rescales a token's combine weights to sum to 1 over
  the experts it was dispatched to. `router_jitter` eps multiplies the router's input by
  U(1 - eps, 1 + eps) in training.
  """
  num_experts: int = 8
  layer_interval: int = 2
  expert_mlp_dim: Optional[int] = None
  router: str = "top_k"
  num_selected_experts: int = 1
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  router_jitter: float = 0.0
  batch_prioritized_routing: bool = False
  normalize_gates: bool = False
  max_group_size: int = 4096
  load_balancing_weight: float = 0.01
  router_z_loss_weight: float = 1e-4

  def __post_init__(self):
    for name in ("num_experts", "layer_interval", "num_selected_experts",
                 "min_expert_capacity", "max_group_size"):
      self._require(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                    "a positive integer")
    if self.expert_mlp_dim is not None:
      self._require("expert_mlp_dim", _is_int(self.expert_mlp_dim) and self.expert_mlp_dim >= 1,
                    "None or a positive integer")
    self._require("router", self.router in ROUTERS, f"one of {ROUTERS}")
    self._require("num_selected_experts", self.num_selected_experts <= self.num_experts,
                  f"at most num_experts ({self.num_experts})")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      self._require(name, _is_number(getattr(self, name)) and getattr(self, name) > 0,
                    "a positive number")
    self._require("router_jitter", _is_number(self.router_jitter) and 0 <= self.router_jitter < 1,
                  "a number in [0, 1)")
    for name in ("load_balancing_weight", "router_z_loss_weight"):
      self._require(name, _is_number(getattr(self, name)) and getattr(self, name) >= 0,
                    "a non-negative number")
    for name in ("batch_prioritized_routing", "normalize_gates"):
      self._require(name, isinstance(getattr(self, name), bool), "a bool")

  def _require(self, name: str, ok: bool, expected: str) -> None:
    if not ok:
      raise MoeConfigError(f"MoeConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

  def is_sparse(self, layer_index: int) -> bool:
    """Whether layer `layer_index` (0-based) of a stack is a MoE layer."""
    return (layer_index + 1) % self.layer_interval == 0

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """Tokens each expert takes per group: max(min_expert_capacity, ceil(k S cf / E))."""
    factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    if self.router == "expert_choice":
      wanted = math.ceil(group_size * factor / self.num_experts)
      return min(group_size, max(self.min_expert_capacity, wanted))
    wanted = math.ceil(self.num_selected_experts * group_size * factor / self.num_experts)
    return max(self.min_expert_capacity, wanted)


class RoutingResult(NamedTuple):
  """`dispatch_mask`, `combine_weights`: [groups, group_size, experts, capacity] float32;
  `load_balancing_loss`, `router_z_loss`: float32 scalars."""
  dispatch_mask: Array
  combine_weights: Array
  load_balancing_loss: Array
  router_z_loss: Array


# ------------------------------------------------------------------------- losses
def _valid_tokens(token_mask: Optional[Array], shape: tuple[int, int]) -> Array:
  """[groups, group_size] float32, 1 for tokens to route (all of them without a mask)."""
  if token_mask is None:
    return jnp.ones(shape, jnp.float32)
  if token_mask.shape != shape:
    raise MoeConfigError(f"token_mask: expected shape {shape}, got {token_mask.shape}")
  return token_mask.astype(jnp.float32)


def router_z_loss(logits: Array, token_mask: Optional[Array] = None) -> Array:
  """ST-MoE z-loss: mean over (unmasked) tokens of logsumexp(logits)^2. logits [G, S, E]."""
  logits = logits.astype(jnp.float32)
  valid = _valid_tokens(token_mask, logits.shape[:2])
  squared = jnp.square(jax.nn.logsumexp(logits, axis=-1))
  return jnp.sum(squared * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def load_balancing_loss(probs: Array, expert_mask: Array,
                        token_mask: Optional[Array] = None) -> Array:
  """Switch loss E * sum_e f_e P_e, averaged over groups; 1.0 when routing is uniform.

  probs [G, S, E] router probabilities; expert_mask [G, S, E] 1 where a token chose the expert
  (before capacity dropping); f_e and P_e are the fraction of tokens choosing e and the mean
  probability of e over the group's (unmasked) tokens.
  """
  num_experts = probs.shape[-1]
  valid = _valid_tokens(token_mask, probs.shape[:2])[..., None]
  count = jnp.maximum(jnp.sum(valid, axis=1), 1.0)  # [G, 1]
  fraction = jnp.sum(expert_mask.astype(jnp.float32) * valid, axis=1) / count  # [G, E]
  mean_prob = jnp.sum(probs.astype(jnp.float32) * valid, axis=1) / count
  return jnp.mean(fraction * mean_prob) * num_experts ** 2


def _normalize_per_token(combine: Array) -> Array:
  """[G, S, E, C] -> the same with each token's weights summing to 1 (or all 0)."""
  total = jnp.sum(combine, axis=(2, 3), keepdims=True)
  return jnp.where(total > 0, combine / jnp.where(total > 0, total, 1.0), 0.0)


# ------------------------------------------------------------------------- routers
def _buffer_positions(choice_mask: Array, order: Optional[Array]) -> Array:
  """Position in the chosen expert's buffer of every choice: [G, S, k, E] int32.

  Every token's j-th choice comes before any token's (j+1)-th; within a rank, tokens go in
  `order` ([G, S] permutation of token indices) or in token order.
  """
  groups, size, k, experts = choice_mask.shape
  if order is not None:
    choice_mask = jnp.take_along_axis(choice_mask, order[:, :, None, None], axis=1)
  by_rank = jnp.swapaxes(choice_mask, 1, 2).reshape(groups, k * size, experts)
  position = jnp.cumsum(by_rank, axis=1) - 1.0
  position = jnp.swapaxes(position.reshape(groups, k, size, experts), 1, 2)
  if order is not None:
    inverse = jnp.argsort(order, axis=-1)
    position = jnp.take_along_axis(position, inverse[:, :, None, None], axis=1)
  return position.astype(jnp.int32)


def top_k_routing(logits: Array, k: int, capacity: int, batch_prioritized: bool = False,
                  normalize_gates: bool = False,
                  token_mask: Optional[Array] = None) -> RoutingResult:
  """Each token picks its k most probable experts; experts keep the first `capacity` choices.

  logits [G, S, E]; token_mask [G, S] bool (False: not routed, not counted in the losses).
  First choices of all tokens take buffer slots before second choices; within a rank tokens go
  in order, or by decreasing top-1 probability with `batch_prioritized`. A token's combine
  weight for an expert is its router probability (renormalised over the surviving choices with
  `normalize_gates`).
  """
  logits = logits.astype(jnp.float32)
  groups, size, experts = logits.shape
  if not 1 <= k <= experts or capacity < 1:
    raise MoeConfigError(f"top_k_routing: expected 1 <= k <= {experts} and capacity >= 1, "
                         f"got k={k}, capacity={capacity}")
  valid = _valid_tokens(token_mask, (groups, size))
  probs = jax.nn.softmax(logits, axis=-1)
  gates, expert_index = jax.lax.top_k(probs, k)  # [G, S, k]
  choice_mask = jax.nn.one_hot(expert_index, experts, dtype=jnp.float32)
  choice_mask = choice_mask * valid[:, :, None, None]  # [G, S, k, E]
  order = jnp.argsort(-gates[..., 0], axis=-1) if batch_prioritized else None
  position = _buffer_positions(choice_mask, order)
  keep = choice_mask * (position < capacity)  # [G, S, k, E]
  slots = jax.nn.one_hot(position, capacity, dtype=jnp.float32) * keep[..., None]
  dispatch = jnp.sum(slots, axis=2)  # [G, S, E, C]; a token's k experts are distinct
  combine = jnp.einsum("gsk,gskec->gsec", gates, slots)
  if normalize_gates:
    combine = _normalize_per_token(combine)
  expert_mask = jnp.max(choice_mask, axis=2)  # [G, S, E], before dropping
  return RoutingResult(dispatch, combine, load_balancing_loss(probs, expert_mask, token_mask),
                       router_z_loss(logits, token_mask))


def expert_choice_routing(logits: Array, capacity: int, normalize_gates: bool = False,
                          token_mask: Optional[Array] = None) -> RoutingResult:
  """Each expert picks the `capacity` tokens of the group it gives the highest probability.

  logits [G, S, E], probabilities softmax over experts; token_mask [G, S] bool: masked tokens
  are never picked (slots beyond the unmasked tokens stay empty). Combine weight = probability.
  The load-balancing loss is 0: experts are balanced by construction.
  """
  logits = logits.astype(jnp.float32)
  groups, size, _ = logits.shape
  if not 1 <= capacity <= size:
    raise MoeConfigError(f"expert_choice_routing: expected 1 <= capacity <= group size ({size}), "
                         f"got capacity={capacity}")
  valid = _valid_tokens(token_mask, (groups, size))
  probs = jax.nn.softmax(logits, axis=-1)
  priority = jnp.where(valid[..., None] > 0, probs, -jnp.inf)
  _, token_index = jax.lax.top_k(jnp.swapaxes(priority, 1, 2), capacity)  # [G, E, C]
  picked = jax.nn.one_hot(token_index, size, dtype=jnp.float32)  # [G, E, C, S]
  dispatch = jnp.einsum("gecs,gs->gsec", picked, valid)
  combine = dispatch * probs[..., None]
  if normalize_gates:
    combine = _normalize_per_token(combine)
  return RoutingResult(dispatch, combine, jnp.zeros((), jnp.float32),
                       router_z_loss(logits, token_mask))


def token_groups(batch: int, length: int, max_group_size: int) -> tuple[int, int]:
  """(num_groups, group_size) for [batch, length] tokens; a group never splits unevenly.

  If a sequence fits, a group is r whole sequences, r the largest divisor of `batch` with
  r * length <= max_group_size; otherwise every sequence is cut into c equal chunks, c the
  smallest divisor of `length` with length / c <= max_group_size.
  """
  for name, value in (("batch", batch), ("length", length), ("max_group_size", max_group_size)):
    if not _is_int(value) or value < 1:
      raise MoeConfigError(f"token_groups: expected a positive integer {name}, got {value!r}")
  if length <= max_group_size:
    per_group = max(r for r in range(1, batch + 1)
                    if batch % r == 0 and r * length <= max_group_size)
    return batch // per_group, per_group * length
  chunks = min(c for c in range(1, length + 1) if length % c == 0 and length // c <= max_group_size)
  return batch * chunks, length // chunks


# ------------------------------------------------------------------------- the layer
class ExpertMlp(nn.Module):
  """All experts' feed-forwards, batched over the expert axis: [E, G, C, embed] -> same.

  Kernels `wi_0`/`wi_1` (gated) or `wi`: [E, embed, mlp]; `wo`: [E, mlp, embed].
  """
  num_experts: int
  mlp_dim: int
  activations: tuple[str, ...]
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    emb = x.shape[-1]
    count = len(self.activations)
    names = ["wi"] if count == 1 else [f"wi_{i}" for i in range(count)]
    hidden = None
    for name, act in zip(names, self.activations):
      kernel = layers.Kernel(name=name, shape=(self.num_experts, emb, self.mlp_dim),
                             axes=("moe_expert", "embed", "mlp"), init=expert_kernel_init)()
      h = layers.activation_fn(act)(
          jnp.einsum("egcd,edh->egch", x.astype(self.dtype), kernel.astype(self.dtype)))
      hidden = h if hidden is None else hidden * h
    hidden = layers.constrain(hidden, ("moe_expert", "moe_group", None, "mlp"))
    hidden = layers.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    wo = layers.Kernel(name="wo", shape=(self.num_experts, self.mlp_dim, emb),
                       axes=("moe_expert", "mlp", "embed"), init=expert_kernel_init)()
    return jnp.einsum("egch,ehd->egcd", hidden, wo.astype(self.dtype))


class MoeLayer(nn.Module):
  """Sparse feed-forward replacing `layers.MlpBlock`: [batch, length, embed] -> same.

  Parameters: `router/kernel` [embed, experts] and `expert/{wi_0,wi_1 | wi,wo}/kernel`; the
  experts' hidden size is `config.expert_mlp_dim`, or `mlp_dim` (the dense model's) if None.
  `token_mask` [batch, length] bool marks the tokens to route (others give zero output).
  """
  config: MoeConfig
  mlp_dim: int
  activations: tuple[str, ...]
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    batch, length, emb = x.shape
    if token_mask is not None and token_mask.shape != (batch, length):
      raise MoeConfigError(f"MoeLayer token_mask: expected shape {(batch, length)}, "
                           f"got {token_mask.shape}")
    num_groups, group_size = token_groups(batch, length, cfg.max_group_size)
    grouped = layers.constrain(x.reshape(num_groups, group_size, emb), ("batch", None, "embed"))
    mask = None if token_mask is None else token_mask.reshape(num_groups, group_size)
    logits = self._router_logits(grouped, deterministic)
    route = self._route(logits, cfg.capacity(group_size, deterministic), mask)

    dispatched = jnp.einsum("gsec,gsd->egcd", route.dispatch_mask.astype(self.dtype),
                            grouped.astype(self.dtype))
    dispatched = layers.constrain(dispatched, ("moe_expert", "moe_group", None, "embed"))
    expert_out = ExpertMlp(cfg.num_experts, cfg.expert_mlp_dim or self.mlp_dim,
                           tuple(self.activations), self.dtype, self.dropout_rate,
                           name="expert")(dispatched, deterministic)
    combined = jnp.einsum("gsec,egcd->gsd", route.combine_weights.astype(self.dtype), expert_out)
    self._sow_metrics(route, mask)
    return layers.constrain(combined.reshape(batch, length, emb), ("batch", "length", "embed"))

  def _router_logits(self, grouped: Array, deterministic: bool) -> Array:
    """[G, S, embed] -> float32 router logits [G, S, experts]."""
    kernel = layers.Kernel(name="router", shape=(grouped.shape[-1], self.config.num_experts),
                           axes=("embed", "unmodeled"), init=router_kernel_init)()
    inputs = grouped.astype(jnp.float32)
    eps = self.config.router_jitter
    if not deterministic and eps > 0:
      inputs = inputs * jax.random.uniform(self.make_rng("dropout"), inputs.shape, jnp.float32,
                                           1.0 - eps, 1.0 + eps)
    return jnp.einsum("gsd,de->gse", inputs, kernel.astype(jnp.float32))

  def _route(self, logits: Array, capacity: int, mask: Optional[Array]) -> RoutingResult:
    cfg = self.config
    if cfg.router == "expert_choice":
      return expert_choice_routing(logits, capacity, cfg.normalize_gates, mask)
    return top_k_routing(logits, cfg.num_selected_experts, capacity,
                         cfg.batch_prioritized_routing, cfg.normalize_gates, mask)

  def _sow_metrics(self, route: RoutingResult, mask: Optional[Array]) -> None:
    """Sows the two losses, `fraction_dropped` and `expert_load` [experts]."""
    dispatch = route.dispatch_mask
    valid = _valid_tokens(mask, dispatch.shape[:2])
    routed = jnp.maximum(jnp.sum(valid), 1.0)
    if self.config.router == "expert_choice":
      picked = (jnp.sum(dispatch, axis=(2, 3)) > 0).astype(jnp.float32)
      dropped = 1.0 - jnp.sum(picked * valid) / routed
    else:
      dropped = 1.0 - jnp.sum(dispatch) / (self.config.num_selected_experts * routed)
    per_expert = jnp.sum(dispatch, axis=(0, 1, 3))
    self.sow("intermediates", "load_balancing_loss", route.load_balancing_loss)
    self.sow("intermediates", "router_z_loss", route.router_z_loss)
    self.sow("intermediates", "fraction_dropped", dropped)
    self.sow("intermediates", "expert_load", per_expert / jnp.maximum(jnp.sum(per_expert), 1.0))


# ------------------------------------------------------------------------- losses of a model
def _moe_layers(tree: Mapping, path: tuple[str, ...] = ()):
  """Yields (path, sown dict) for every node of `tree` holding a MoE layer's sown values."""
  if all(name in tree for name in LOSS_NAMES):
    yield path, tree
    return
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _moe_layers(value, path + (str(key),))


def _metric_path(path: tuple[str, ...]) -> str:
  """'encoder/layers_1/mlp' -> 'encoder/layers_1': the block the MoE feed-forward sits in."""
  if len(path) > 1 and path[-1] == "mlp":
    path = path[:-1]
  return "/".join(path) or "moe"


def router_losses_and_metrics(intermediates: Mapping, config: MoeConfig
                              ) -> tuple[Array, dict[str, Array]]:
  """(weighted auxiliary loss, metrics) from the `intermediates` of `model.apply`.

  Loss = load_balancing_weight * sum of load-balancing losses + router_z_loss_weight * sum of
  z-losses over MoE layers. Metrics: the two unweighted sums, mean `fraction_dropped`, and per
  layer `fraction_dropped/<path>` and `expert_load_max/<path>`. A layer called several times
  adds its losses and averages its metrics. No MoE layer: (0.0, {}).
  """
  if "intermediates" in intermediates and isinstance(intermediates["intermediates"], Mapping):
    intermediates = intermediates["intermediates"]
  found = list(_moe_layers(intermediates))
  if not found:
    return jnp.zeros((), jnp.float32), {}
  total = lambda values: jnp.sum(jnp.stack([jnp.asarray(v, jnp.float32) for v in values]), axis=0)
  mean = lambda values: total(values) / len(values)
  balance = sum(total(sown["load_balancing_loss"]) for _, sown in found)
  z_loss = sum(total(sown["router_z_loss"]) for _, sown in found)
  metrics = {"load_balancing_loss": balance, "router_z_loss": z_loss}
  dropped = {}
  for path, sown in found:
    name = _metric_path(path)
    if "fraction_dropped" in sown:
      dropped[name] = mean(sown["fraction_dropped"])
      metrics[f"fraction_dropped/{name}"] = dropped[name]
    if "expert_load" in sown:
      metrics[f"expert_load_max/{name}"] = jnp.max(mean(sown["expert_load"]))
  if dropped:
    metrics["fraction_dropped"] = sum(dropped.values()) / len(dropped)
  loss = config.load_balancing_weight * balance + config.router_z_loss_weight * z_loss
  return loss, metrics
