"""The paper's expert: bottleneck adapters (ELM, from compacter/ATTEMPT).

`z + W_up gelu_tanh(W_down z + b_down) + b_up` with bottleneck d_model // reduction_factor (32
by default), after the self-attention output and after the feed-forward output of every encoder
and decoder block, none on cross-attention: `encoder/layers_N/{attention,mlp}_adapter` and
`decoder/layers_N/{self_attention,mlp}_adapter`, each holding `down_kernel` [embed, bottleneck],
`down_bias` [bottleneck], `up_kernel` [bottleneck, embed], `up_bias` [embed]. Weights
~ N(0, init_std^2), biases zero. With `train_layer_norms` (the paper) every layer-norm scale
belongs to the expert too. An adapter whose four tensors are zero adds exactly zero.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from elm_jax.models.experts.base import ExpertConfigError, ExpertKind
from elm_jax.models.layers import param_with_axes

Array = jax.Array
# The sub-layers an adapter follows: self-attention (the encoder's `attention`, the decoder's
# `self_attention`) and the feed-forward; never cross-attention.
SITES = ("attention", "self_attention", "mlp")
_ADDED = re.compile(r"(^|/)(" + "|".join(SITES) + r")_adapter/")


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


class AdapterKind(ExpertKind):
  name = "adapter"
  fields = ("reduction_factor", "init_std")

  def validate(self, config) -> None:
    if not isinstance(config.reduction_factor, int) or config.reduction_factor < 1:
      raise ExpertConfigError(f"ExpertConfig.reduction_factor: expected a positive integer, got "
                              f"{config.reduction_factor!r}")

  def describe(self, config) -> str:
    return f"adapters (reduction factor {config.reduction_factor})"

  def adds(self, path: str) -> bool:
    return bool(_ADDED.search(path))

  def sublayer_output(self, config, module, site: str, h: Array) -> Array:
    if site not in SITES:
      return h
    return BottleneckAdapter(max(1, h.shape[-1] // config.reduction_factor), config.init_std, h.dtype,
                             name=f"{site}_adapter")(h)


KIND = AdapterKind()
