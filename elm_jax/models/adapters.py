"""Expert parameterisations on a frozen T5: bottleneck adapters (the paper's), LoRA, or full
fine-tuning, and the split of a parameter tree into the frozen backbone and the expert.

Bottleneck adapter (ELM, from compacter/ATTEMPT): `z + W_up gelu_tanh(W_down z + b_down) + b_up`
with bottleneck d_model // reduction_factor (32 by default), after the self-attention output
and after the feed-forward output of every encoder and decoder block, none on cross-attention.
Weights ~ N(0, 0.01^2), biases zero. Every layer-norm scale is trainable and belongs to the
expert.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from elm_jax import tree_paths
from elm_jax.errors import UserInputError
from elm_jax.models.layers import param_with_axes

Array = jax.Array
EXPERT_KINDS = ("adapter", "lora", "full")


class ExpertConfigError(UserInputError):
  """An expert configuration the model cannot build."""


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """What an expert trains. `kind`: 'adapter' (the paper), 'lora', or 'full' fine-tuning.

  `train_layer_norms` adds every layer-norm scale to the expert (the paper does, for adapters).
  LoRA adds `lora_a @ lora_b * (lora_alpha / lora_rank)` (a [in, rank], b [rank, out]) to the kernels named in `lora_targets`
  (attention `query`/`key`/`value`/`out`, MLP `wi_0`/`wi_1`/`wi`/`wo`), `lora_b` initialised to zero.
  """
  kind: str = "adapter"
  reduction_factor: int = 32
  init_std: float = 0.01
  train_layer_norms: bool = True
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    if self.kind not in EXPERT_KINDS:
      raise ExpertConfigError(f"ExpertConfig.kind: expected one of {EXPERT_KINDS}, got {self.kind!r}")
    if self.reduction_factor < 1 or self.lora_rank < 1:
      raise ExpertConfigError("ExpertConfig.reduction_factor and lora_rank must be positive integers")
    bad = set(self.lora_targets) - {"query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo"}
    if bad:
      raise ExpertConfigError(f"ExpertConfig.lora_targets: unknown projection(s) {sorted(bad)}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))


class BottleneckAdapter(nn.Module):
  """[..., embed] -> [..., embed]: z + up(gelu_tanh(down(z)))."""
  bottleneck: int
  init_std: float = 0.01
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    emb = z.shape[-1]
    init = nn.initializers.normal(self.init_std)
    down = param_with_axes(self, "down_kernel", init, (emb, self.bottleneck), ("embed", "bottleneck"))
    down_b = param_with_axes(self, "down_bias", nn.initializers.zeros, (self.bottleneck,), ("bottleneck",))
    up = param_with_axes(self, "up_kernel", init, (self.bottleneck, emb), ("bottleneck", "embed"))
    up_b = param_with_axes(self, "up_bias", nn.initializers.zeros, (emb,), ("embed",))
    h = jax.nn.gelu(jnp.dot(z.astype(self.dtype), down.astype(self.dtype)) + down_b.astype(self.dtype),
                    approximate=True)
    return z + (jnp.dot(h, up.astype(self.dtype)) + up_b.astype(self.dtype)).astype(z.dtype)


# ------------------------------------------------------------------ backbone / expert split
_NORM = re.compile(r"(^|/)(pre_\w+_layer_norm|encoder_norm|decoder_norm)/scale$")
_ADAPTER = re.compile(r"(^|/)\w+_adapter/")
_LORA = re.compile(r"/lora_[ab]$")


def is_expert_parameter(path: str, config: ExpertConfig) -> bool:
  """Whether the parameter at `path` ('encoder/layers_0/mlp_adapter/up_kernel') is trained."""
  if config.kind == "full":
    return True
  if _ADAPTER.search(path) or _LORA.search(path):
    return True
  return bool(config.train_layer_norms and _NORM.search(path))


def expert_parameters(model_params: dict, config: ExpertConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """The exact tensors an expert of `config` holds, {'encoder/layers_0/mlp_adapter/up_kernel':
  ShapeDtypeStruct((bottleneck, embed), float32), ...} in sorted order, given the parameter tree
  of the model built with it (abstract, from `jax.eval_shape` of `t5.init_params(...,
  expert=config)`, or concrete): its leaves that `is_expert_parameter` selects, as training
  splits them. Derived from the model, so it is what training writes and the model reads."""
  _, expert = split_params(model_params, config)
  return {tree_paths.join(p): jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
          for p, v in sorted(tree_paths.flatten(expert).items())}


def split_params(params: dict, config: ExpertConfig) -> tuple[dict, dict]:
  """Full tree -> (frozen backbone tree, expert tree); together they hold every leaf once."""
  flat = tree_paths.flatten(params)
  expert = {p: v for p, v in flat.items() if is_expert_parameter(tree_paths.join(p), config)}
  backbone = {p: v for p, v in flat.items() if p not in expert}
  return tree_paths.unflatten(backbone), tree_paths.unflatten(expert)


def merge_params(backbone: dict, expert: dict) -> dict:
  """Inverse of `split_params`: expert leaves override or extend the backbone's."""
  flat = tree_paths.flatten(backbone)
  flat.update(tree_paths.flatten(expert))
  return tree_paths.unflatten(flat)


def count_parameters(tree: dict) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
