"""LoRA experts: a low-rank update of the kernels named in `lora_targets`.

A targeted kernel W [in, out] (`query`, `key`, `value`, `out` of every attention, `wi_0`,
`wi_1`, `wi`, `wo` of every dense feed-forward) computes with W + (lora_alpha / lora_rank) a @ b,
where `lora_a` [in, rank] ~ N(0, 1 / in) and `lora_b` [rank, out] = 0 live beside the kernel
(`encoder/layers_0/attention/query/lora_a`), on the kernel's logical axes and `lora_rank`.
With `train_layer_norms` every layer-norm scale belongs to the expert too.

Routing (`models/routing.py`): one expert adds (lora_alpha / lora_rank) (x @ a) @ b to a
targeted projection's output x @ W (`kernel_delta`, never forming a @ b). Arrow's prototype of a
targeted module is the top singular vector of the update a @ b on its input side (the top right
singular vector of the update in PEFT's [out, in] convention): the input direction the update
amplifies most, computed from the QR factors of a and b (`arrow_prototypes`).

Merging: besides every kind's merges, `lora_factors` averages the factors (whose update is
mean(a) @ mean(b), not the mean update) and `lora_updates` averages the updates exactly, as
one LoRA of k times the rank.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax import tree_paths
from elm_jax.models.experts.base import ExpertConfigError, ExpertKind, MergeError
from elm_jax.models.layers import param_with_axes

Array = jax.Array
Path = tuple[str, ...]
TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")


class LoraKind(ExpertKind):
  name = "lora"
  fields = ("lora_rank", "lora_alpha", "lora_targets")
  merge_methods = ("lora_updates", "lora_factors")

  def validate(self, config) -> None:
    if not isinstance(config.lora_rank, int) or config.lora_rank < 1:
      raise ExpertConfigError(f"ExpertConfig.lora_rank: expected a positive integer, got {config.lora_rank!r}")
    bad = set(config.lora_targets) - set(TARGETS)
    if bad:
      raise ExpertConfigError(f"ExpertConfig.lora_targets: unknown projection(s) {sorted(bad)}; "
                              f"expected some of {list(TARGETS)}")

  def describe(self, config) -> str:
    return f"LoRA (rank {config.lora_rank} on {', '.join(config.lora_targets)})"

  def adds(self, path: str) -> bool:
    return path.endswith(("/lora_a", "/lora_b"))

  def kernel(self, config, module, kernel: Array) -> Array:
    if module.name not in config.lora_targets or len(module.shape) != 2:
      return kernel
    fan_in, fan_out = module.shape
    a = param_with_axes(module, "lora_a", nn.initializers.normal(fan_in ** -0.5),
                        (fan_in, config.lora_rank), (module.axes[0], "lora_rank"))
    b = param_with_axes(module, "lora_b", nn.initializers.zeros, (config.lora_rank, fan_out),
                        ("lora_rank", module.axes[1]))
    return kernel + (config.lora_alpha / config.lora_rank) * jnp.dot(a, b)

  arrow_refusal = None

  def kernel_delta(self, config, module, params, kernel, x, y):
    if "lora_a" not in params or module.name not in config.lora_targets:
      return None
    a, b = params["lora_a"].astype(x.dtype), params["lora_b"].astype(x.dtype)
    return (config.lora_alpha / config.lora_rank) * jnp.dot(jnp.dot(x, a), b)

  def arrow_prototypes(self, config, params):
    """The top input-side singular vector of a @ b [in, out] per targeted kernel: with
    a = Qa Ra and b^T = Qb Rb (QR), a @ b = Qa (Ra Rb^T) Qb^T, so it is Qa u for u the top left
    singular vector of the [rank, rank] Ra Rb^T. A zero update has no direction: zero vector."""
    out = {}
    for a_path, b_path in _pairs(list(params)):
      a, b = np.asarray(params[a_path], np.float64), np.asarray(params[b_path], np.float64)
      qa, ra = np.linalg.qr(a)
      _, rb = np.linalg.qr(b.T)
      u, s, _ = np.linalg.svd(ra @ rb.T)
      out[a_path[:-1]] = qa @ u[:, 0] if s[0] > 0 else np.zeros(a.shape[0])
    return out

  def merge(self, method: str, stacked: Mapping[Path, np.ndarray], weights: np.ndarray
            ) -> tuple[dict[Path, np.ndarray], dict[str, Any]]:
    """`lora_factors`: the weighted mean of the `a` factors and, separately, of the `b` factors
    (and of the other leaves). `lora_updates`: the exact weighted mean of the updates. The
    model adds (alpha / r) a @ b (a [in, r], b [r, out]); the mean update (alpha / r) sum_i
    w_i a_i @ b_i equals (alpha / (k r)) a' @ b' with a' = [a_1 ... a_k] [in, k r] and
    b' = k [w_1 b_1; ...; w_k b_k] [k r, out]: the factor k keeps `lora_alpha` unchanged while
    the rank becomes k r (returned as the config change). Other leaves take the weighted mean."""
    pairs = _pairs(list(stacked))
    merged = {p: np.tensordot(weights, v, axes=1) for p, v in stacked.items()}
    if method == "lora_factors":
      return merged, {}
    if method != "lora_updates":
      return super().merge(method, stacked, weights)
    ranks = {stacked[a].shape[-1] for a, _ in pairs}
    if len(ranks) != 1:
      raise MergeError(f"experts: expected one LoRA rank for every target, got ranks {sorted(ranks)}")
    k = len(weights)
    for a, b in pairs:
      merged[a] = np.concatenate(list(stacked[a]), axis=-1)  # [in, k r]
      merged[b] = np.concatenate([k * w * factor for w, factor in zip(weights, stacked[b])], axis=0)  # [k r, out]
    return merged, {"lora_rank": k * ranks.pop()}


def _pairs(paths: list[Path]) -> list[tuple[Path, Path]]:
  """The (lora_a, lora_b) path pairs among `paths`; an unpaired factor is an error."""
  a_parents = {p[:-1] for p in paths if p[-1] == "lora_a"}
  b_parents = {p[:-1] for p in paths if p[-1] == "lora_b"}
  for parent in sorted(a_parents ^ b_parents):
    have, lack = ("lora_a", "lora_b") if parent in a_parents else ("lora_b", "lora_a")
    raise MergeError(f"expert 0: parameter {tree_paths.join(parent + (have,))!r} has no {lack!r} beside it")
  if not a_parents:
    raise MergeError("experts: expected LoRA experts (leaves named lora_a and lora_b), found none")
  return [(parent + ("lora_a",), parent + ("lora_b",)) for parent in sorted(a_parents)]


KIND = LoraKind()
