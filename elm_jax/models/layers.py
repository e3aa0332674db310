"""T5 building blocks: RMS layer norm, relative-position bias, attention with a KV cache, MLP.

Every parameter carries logical axis names (`embed`, `joined_kv`, `mlp`, `heads`,
`relpos_buckets`, `vocab`) and key activations are constrained to (`batch`, `length`, ...), so
a partitioner can place them on any mesh through one table of rules.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                    axes: tuple[str, ...]) -> Array:
  """Declares a float32 parameter whose boxed value records its logical axes."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


def dropout_keep_mask(rng: Array, rate: float, shape: Sequence[int]) -> Array:
  """Bernoulli(1 - rate) keep mask of `shape`: each 32-bit threefry word gives two 16-bit
  draws, for neighbouring entries of the last axis (half the random-number work of
  `jax.random.bernoulli`, which spent a tenth of a training step on a CPU; the words have the
  mask's leading axes, so a mask sharded like its activations is drawn where they live). The
  drop probability is `rate` rounded to 1/65536 (0.1: 0.100006)."""
  wanted = tuple(shape)
  shape = wanted or (1,)
  last = shape[-1]
  words = jax.random.bits(rng, shape[:-1] + (-(-last // 2),), jnp.uint32)
  draws = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(shape[:-1] + (2 * words.shape[-1],))
  return draws[..., :last].reshape(wanted) >= jnp.uint32(round(rate * 65536))


def dropout(x: Array, rate: float, rng: Array, broadcast_dims: Sequence[int] = ()) -> Array:
  """Inverted dropout of `x`: zero with probability `rate`, else scale by 1 / (1 - rate); one
  draw shared along each axis of `broadcast_dims`."""
  shape = [1 if d in {a % x.ndim for a in broadcast_dims} else n for d, n in enumerate(x.shape)]
  keep = dropout_keep_mask(rng, rate, shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dropout(nn.Module):
  """`flax.linen.Dropout` with the cheaper mask of `dropout_keep_mask` (rng stream `dropout`)."""
  rate: float
  broadcast_dims: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"), self.broadcast_dims)


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, computed in float32. [..., embed]."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  expert: Any = None  # models.experts.ExpertSet: `layer_norm_scale` gives the scale used

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    if self.expert is not None:
      scale = self.expert.layer_norm_scale(self, x, scale)
    y = x32 * jax.lax.rsqrt(variance + self.epsilon)
    return (y * scale).astype(self.dtype)


def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucketing of key_pos - query_pos, as an int32 table [query_length, key_length].

  Computed on the host with float32 arithmetic exactly as the reference implementation does
  (positions are static, so the table is a compile-time constant).
  """
  context = np.arange(query_length, dtype=np.int64)[:, None]
  memory = np.arange(key_length, dtype=np.int64)[None, :]
  relative = memory - context
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  with np.errstate(divide="ignore"):
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = (log_ratio / np.float32(np.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(is_small, distance, large)
  return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned per-head bias indexed by relative-position bucket: returns [1, heads, q, k]."""
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> Array:
    table = param_with_axes(self, "rel_embedding", nn.initializers.normal(1.0),
                            (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    buckets = relative_position_buckets(
        query_length, key_length, bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    bias = jnp.take(table, jnp.asarray(buckets), axis=1)  # [heads, q, k]
    return bias[None].astype(self.dtype)


class Kernel(nn.Module):
  """A named sub-module holding one `kernel`, so the tree reads `attention/query/kernel`.

  With `expert` (a `models.experts.ExpertSet`) the kernel computed with is what the experts'
  kinds make of it (`ExpertSet.kernel`: LoRA adds a low-rank update to it); their
  parameters live beside the kernel (`attention/query/lora_a`)."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: Callable = default_kernel_init
  expert: Any = None

  @nn.compact
  def __call__(self, x: Optional[Array] = None, dtype: Any = None) -> Array:
    """The kernel; or, given x [..., in], the projection x @ kernel [..., out] in `dtype` (what
    the experts make of it: `ExpertSet.kernel_output`, where routing mixes experts' outputs)."""
    kernel = param_with_axes(self, "kernel", self.init, self.shape, self.axes)
    kernel = kernel if self.expert is None else self.expert.kernel(self, kernel)
    if x is None:
      return kernel
    x = x.astype(dtype)
    y = jnp.dot(x, kernel.astype(dtype))
    return y if self.expert is None else self.expert.kernel_output(self, kernel, x, y)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention without logit scaling (T5 folds it into the query).

  Inputs `[batch, q_len, embed]` and `[batch, kv_len, embed]`, `bias` broadcastable to
  `[batch, heads, q_len, kv_len]` (additive: masks and position bias). The key/value input may
  instead have `batch / G` rows, each shared by G consecutive query rows (rank classification:
  the choices of one input): its keys and values are then projected once per row and the G
  query rows attend to them as one row of G x q_len queries; `bias` is then per key/value row. With `decode=True` the
  keys and values are appended to a cache (`cached_key`, `cached_value`: [batch, max_len, heads,
  head_dim]) at `cache_index`, and a full-length self-attention `bias` ([1, heads, max_len,
  max_len]) is sliced to the current query rows.
  """
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.0
  expert: Any = None  # models.experts.ExpertSet, handed to every Kernel

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Optional[Array], *,
               decode: bool = False, deterministic: bool = True) -> Array:
    emb = inputs_q.shape[-1]
    joined = self.num_heads * self.head_dim

    def project(name, x):
      y = Kernel(name=name, shape=(emb, joined), axes=("embed", "joined_kv"), expert=self.expert)(x, self.dtype)
      y = y.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
      return constrain(y, ("batch", "length", "heads", "kv"))

    query = project("query", inputs_q)
    key = project("key", inputs_kv)
    value = project("value", inputs_kv)
    rows, q_len = inputs_q.shape[:2]
    shared = inputs_kv.shape[0] != rows
    if shared:  # fold each key/value row's G query rows into one row of G x q_len queries
      if decode or rows % inputs_kv.shape[0]:
        raise ValueError(f"MultiHeadAttention: {rows} query rows cannot share {inputs_kv.shape[0]} "
                         "key/value rows" + (" while decoding" if decode else ""))
      query = query.reshape(inputs_kv.shape[0], -1, *query.shape[2:])

    if decode:
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        index = cache_index.value
        key = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key.astype(cached_key.value.dtype), index, axis=1)
        value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value.astype(cached_value.value.dtype), index, axis=1)
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + inputs_q.shape[1]
        # Only keys at positions <= the current one are visible.
        visible = jnp.arange(key.shape[1]) < index + inputs_q.shape[1]
        step_bias = jnp.where(visible, 0.0, NEG_INF)[None, None, None, :]
        if bias is not None:
          bias = jax.lax.dynamic_slice_in_dim(bias, index, inputs_q.shape[1], axis=-2)
        bias = step_bias if bias is None else bias + step_bias

    # Heads next to batch before both batched matmuls: XLA's CPU backend runs them 1.6-4.9x faster
    # forward in this layout (bench/bench_attention.py); accelerators lay them out either way.
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [b, h, len, d]
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    if not deterministic and self.dropout_rate > 0:
      weights = dropout(weights, self.dropout_rate, self.make_rng("dropout"))
    attended = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(self.dtype), value.astype(self.dtype))
    attended = jnp.swapaxes(attended, 1, 2).reshape(rows, q_len, joined)
    out = Kernel(name="out", shape=(joined, emb), axes=("joined_kv", "embed"), expert=self.expert)(
        attended, self.dtype)
    return constrain(out, ("batch", "length", "embed"))


def activation_fn(name: str) -> Callable[[Array], Array]:
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=True)
  return lambda x: x


class MlpBlock(nn.Module):
  """T5 feed-forward: gated (`wi_0`, `wi_1`) or plain (`wi`), then `wo`. [batch, len, embed]."""
  mlp_dim: int
  activations: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.0
  expert: Any = None  # models.experts.ExpertSet, handed to every Kernel

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    emb = x.shape[-1]
    names = ["wi"] if len(self.activations) == 1 else [f"wi_{i}" for i in range(len(self.activations))]
    hidden = None
    for name, act in zip(names, self.activations):
      h = activation_fn(act)(Kernel(name=name, shape=(emb, self.mlp_dim), axes=("embed", "mlp"),
                                    expert=self.expert)(x, self.dtype))
      hidden = h if hidden is None else hidden * h
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    wo = Kernel(name="wo", shape=(self.mlp_dim, emb), axes=("mlp", "embed"), expert=self.expert)(hidden, self.dtype)
    return constrain(wo, ("batch", "length", "embed"))
