"""Sparse upcycling (Komatsuzaki et al., 2023): a Mixture-of-Experts T5 from a dense checkpoint.

Every sparse layer's feed-forward kernels (`mlp/wi_0`, `mlp/wi_1` or `mlp/wi`, `mlp/wo`) are
copied into each of its experts (`mlp/expert/<name>/kernel`, [experts, ...]) and the router
(`mlp/router/kernel`) is initialised afresh; every other parameter is kept. With gates
renormalised over the chosen experts (`MoeConfig.normalize_gates`) and enough capacity, the
upcycled model computes exactly what the dense one does until the experts diverge in training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from elm_jax import tree_paths
from elm_jax.models import moe
from elm_jax.models.t5 import param_shapes
from elm_jax.models.t5_config import ConfigError, T5Config


def upcycle_params(dense_params: Any, config: T5Config, rng: jax.Array) -> dict:
  """Dense T5 parameters -> parameters of `config` (the same T5 with `config.moe` set).

  Raises ConfigError naming the first parameter whose shape does not fit `config`.
  """
  if config.moe is None:
    raise ConfigError("upcycle_params: the target T5Config has no `moe`; nothing to upcycle")
  dense = tree_paths.flatten(dense_params)
  dense_config = config.replace(moe=None)
  for path, shape in tree_paths.flatten(param_shapes(dense_config)).items():
    if path not in dense:
      raise ConfigError(f"upcycle_params: the dense checkpoint has no parameter "
                        f"{tree_paths.join(path)} (expected shape {shape})")
    if tuple(np.shape(dense[path])) != tuple(shape):
      raise ConfigError(f"upcycle_params: parameter {tree_paths.join(path)} has shape "
                        f"{tuple(np.shape(dense[path]))}; the model config expects {shape}")
  num_experts = config.moe.num_experts
  out = {}
  routers = 0
  for path, shape in tree_paths.flatten(param_shapes(config)).items():
    if path in dense:
      out[path] = np.asarray(dense[path], np.float32)
    elif "router" in path:
      routers += 1
      key = jax.random.fold_in(rng, routers)
      out[path] = np.asarray(moe.router_kernel_init(key, shape, np.float32))
    else:  # (..., 'mlp', 'expert', name, 'kernel') <- (..., 'mlp', name, 'kernel')
      source = path[:-3] + path[-2:]
      kernel = np.asarray(dense[source], np.float32)
      if (num_experts,) + kernel.shape != tuple(shape):
        raise ConfigError(f"upcycle_params: cannot copy {tree_paths.join(source)} {kernel.shape} "
                          f"into {tree_paths.join(path)} {tuple(shape)}: an upcycled expert keeps "
                          "the dense mlp_dim (MoeConfig.expert_mlp_dim must be None or equal)")
      out[path] = np.broadcast_to(kernel, shape).copy()
  return tree_paths.unflatten(out)
