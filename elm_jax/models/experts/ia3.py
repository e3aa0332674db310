"""(IA)^3 experts (T-Few, Liu et al. 2022): learned vectors that rescale the keys and values of
every attention (self- and cross-attention) and the feed-forward's inner activation.

The vector lives beside the kernel it scales, as `ia3_scale` on the logical axis of the scaled
dimension: `<stack>/layers_N/<attention>/key/ia3_scale` and `.../value/ia3_scale` [joined_kv]
scale each output feature of the key and value projections (the T-Few `l_k`, `l_v`), and
`<stack>/layers_N/mlp/wo/ia3_scale` [mlp] scales each input row of `wo`, i.e. the activation
entering it (`l_ff`). Scaling a projection's output (or input) equals scaling its kernel's
columns (or rows), which is how the model applies it. Every scale starts at 1, the identity, and
task vectors start there too. With `train_layer_norms` (False in T-Few's recipe,
gin_configs/experts/ia3.gin) the layer-norm scales belong to the expert as well.

Routing (`models/routing.py`): one expert changes a key or value projection's output y by
y * (l - 1) and `wo`'s by (x * (l - 1)) @ wo (`kernel_delta`), so a mixture of experts with
weights summing to 1 scales y by sum_e w_e l_e. Arrow does not route IA3 experts
(`arrow_refusal`): their change is a diagonal rescaling, whose singular vectors are coordinate
axes ordered by |l - 1|, not a direction of the inputs the expert was trained on.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from elm_jax.models.experts.base import ExpertKind
from elm_jax.models.layers import param_with_axes

Array = jax.Array
NAME = "ia3_scale"
# Kernels whose output is scaled (keys and values of every attention) and whose input is (the
# feed-forward's `wo`), by module path.
_OUTPUT_SCALED = re.compile(r"(^|/)(attention|self_attention|encoder_decoder_attention)/(key|value)$")
_INPUT_SCALED = re.compile(r"(^|/)mlp/wo$")


class Ia3Kind(ExpertKind):
  name = "ia3"

  def describe(self, config) -> str:
    return "(IA)^3 scales (keys, values, feed-forward activations)"

  def adds(self, path: str) -> bool:
    return path.endswith("/" + NAME)

  def identity(self, path: str) -> float:
    return 1.0

  def kernel(self, config, module, kernel: Array) -> Array:
    path = "/".join(module.path)
    if _OUTPUT_SCALED.search(path):
      scale = param_with_axes(module, NAME, nn.initializers.ones, (module.shape[1],), (module.axes[1],))
      return kernel * scale[None, :]
    if _INPUT_SCALED.search(path):
      scale = param_with_axes(module, NAME, nn.initializers.ones, (module.shape[0],), (module.axes[0],))
      return kernel * scale[:, None]
    return kernel


  arrow_refusal = ("an (IA)^3 expert only rescales features (a diagonal change, whose singular vectors "
                   "are coordinate axes), so it has no input direction to route by; route IA3 experts "
                   "per example (retrieval), by gates or uniformly")

  def kernel_delta(self, config, module, params, kernel, x, y):
    if NAME not in params:
      return None
    path = "/".join(module.path)
    scale = params[NAME].astype(y.dtype) - 1
    if _OUTPUT_SCALED.search(path):
      return y * scale
    if _INPUT_SCALED.search(path):
      return jnp.dot(x * scale, kernel.astype(x.dtype))
    return None


KIND = Ia3Kind()
