"""The paper's expert: bottleneck adapters (ELM, from compacter/ATTEMPT).

`z + W_up gelu_tanh(W_down z + b_down) + b_up` with bottleneck d_model // reduction_factor (32
by default), after the self-attention output and after the feed-forward output of every encoder
and decoder block, none on cross-attention: `encoder/layers_N/{attention,mlp}_adapter` and
`decoder/layers_N/{self_attention,mlp}_adapter`, each holding `down_kernel` [embed, bottleneck],
`down_bias` [bottleneck], `up_kernel` [bottleneck, embed], `up_bias` [embed]. Weights
~ N(0, init_std^2), biases zero. With `train_layer_norms` (the paper) every layer-norm scale
belongs to the expert too. An adapter whose four tensors are zero adds exactly zero.

Routing (`models/routing.py`): one expert adds `up(gelu_tanh(down(z)))` (`bottleneck_delta`, the
very arithmetic of `BottleneckAdapter`) to the sub-layer output z. Arrow's prototype of an
adapter is the top left singular vector of its down-projection kernel [embed, bottleneck]: the
direction of the embed-space input z that the adapter's bottleneck reads most strongly. An
adapter's change is a nonlinear function of `down(z)` alone, so z's component along that
vector is what moves its output most (for a linear adapter up @ down it is exactly the top
input singular vector of the update, LoRA's prototype); the up-projection and the biases do
not change which inputs the adapter responds to, so they are left out.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models.experts.base import ExpertConfigError, ExpertKind
from elm_jax.models.layers import param_with_axes

Array = jax.Array
# The sub-layers an adapter follows: self-attention (the encoder's `attention`, the decoder's
# `self_attention`) and the feed-forward; never cross-attention.
SITES = ("attention", "self_attention", "mlp")
_ADDED = re.compile(r"(^|/)(" + "|".join(SITES) + r")_adapter/")


def bottleneck_delta(params, z: Array, dtype) -> Array:
  """up(gelu_tanh(down(z))) [..., embed] of one adapter's four tensors (`params`, as stored),
  computed in `dtype` and returned in z's dtype: what the adapter adds to z."""
  h = jax.nn.gelu(jnp.dot(z.astype(dtype), params["down_kernel"].astype(dtype)) + params["down_bias"].astype(dtype),
                  approximate=True)
  return (jnp.dot(h, params["up_kernel"].astype(dtype)) + params["up_bias"].astype(dtype)).astype(z.dtype)


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
    tensors = {"down_kernel": down, "down_bias": down_b, "up_kernel": up, "up_bias": up_b}
    return z + bottleneck_delta(tensors, z, self.dtype)


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


  arrow_refusal = None

  def sublayer_delta(self, config, module, site, params, h):
    if site not in SITES or f"{site}_adapter" not in params:
      return None
    return bottleneck_delta(params[f"{site}_adapter"], h, h.dtype)

  def arrow_prototypes(self, config, params):
    """{block path + (site,): top left singular vector of `down_kernel` [embed]} per adapter."""
    out = {}
    for path, value in params.items():
      if path[-1] == "down_kernel" and _ADDED.search("/".join(path)):
        u, s, _ = np.linalg.svd(np.asarray(value, np.float64), full_matrices=False)
        out[path[:-2] + (path[-2][:-len("_adapter")],)] = u[:, 0] if s[0] > 0 else np.zeros(u.shape[0])
    return out


KIND = AdapterKind()
