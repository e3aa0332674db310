"""Encoder-decoder T5 in the T5X parameter layout (T5 v1.1 / LM-adapted, original T5, mT5).

`Transformer.encode` maps tokens `[batch, enc_len]` to `[batch, enc_len, embed]`;
`Transformer.decode` maps decoder tokens `[batch, dec_len]` to float32 logits
`[batch, dec_len, vocab]`, with an optional KV cache for incremental decoding.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from elm_jax.models import layers
from elm_jax.models.experts import ExpertConfig, ExpertSet
from elm_jax.models.moe import MoeLayer
from elm_jax.models.t5_config import T5Config

Array = jax.Array


class Embed(nn.Module):
  """Token embedding `[vocab, embed]`; `attend` gives `x @ embedding.T` for tied logits."""
  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = layers.param_with_axes(
        self, "embedding", nn.initializers.normal(1.0), (self.vocab_size, self.features),
        ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))


def _key_mask_bias(mask: Array) -> Array:
  """[batch, k] bool -> additive bias [batch, 1, 1, k]."""
  return jnp.where(mask[:, None, None, :], 0.0, layers.NEG_INF).astype(jnp.float32)


def _segment_bias(query_segments: Array, key_segments: Array) -> Array:
  """Packed rows: a query sees the keys of its own segment only (0 = padding, seen by none).
  query_segments [batch, q], key_segments [batch, k] -> additive bias [batch, 1, q, k]. T5's
  relative-position bias needs no per-segment positions: within a segment, the distance
  between two packed positions is the distance between the unpacked ones."""
  same = (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] > 0)
  return jnp.where(same[:, None], 0.0, layers.NEG_INF).astype(jnp.float32)


def _cross_segment_bias(encoder_segments: Array, row_segments: Array, query_length: int) -> Array:
  """Cross-attention bias for decoder rows over packed encoder rows: encoder_segments [kv_rows,
  k], row_segments [rows] (the segment each decoder row reads; rows = G x kv_rows, the G rows
  of a key/value row consecutive, as `MultiHeadAttention` folds them) -> [kv_rows, 1,
  G x query_length, k]."""
  kv_rows = encoder_segments.shape[0]
  per_query = jnp.repeat(row_segments.reshape(kv_rows, -1), query_length, axis=1)
  return _segment_bias(per_query, encoder_segments)


def _sublayer_output(block: nn.Module, site: str, h: Array) -> Array:
  """The output of sub-layer `site` of `block` as the block's experts make it (adapters add a
  module there; `ExpertSet.sublayer_output`): h [batch, length, embed]."""
  return h if block.expert is None else block.expert.sublayer_output(block, site, h)


def _dropout(cfg: T5Config) -> layers.Dropout:
  """The dropout of the embeddings, every sub-layer output and the final layer norms: per
  element (Hugging Face's T5, the paper's code), or with `dropout_broadcast_over_length` one
  draw per feature shared along the sequence (T5X's `broadcast_dims=(-2,)`)."""
  return layers.Dropout(cfg.dropout_rate, broadcast_dims=(-2,) if cfg.dropout_broadcast_over_length else ())


def _feed_forward(cfg: T5Config, sparse: bool, expert: Optional[ExpertSet], h: Array,
                  token_mask: Optional[Array], deterministic: bool) -> Array:
  """The block's `mlp`: dense (`MlpBlock`, its kernels handed to the experts) or, in a sparse
  layer, a `MoeLayer` that routes the tokens of `token_mask` ([batch, length] bool; None: all)."""
  if sparse:
    return MoeLayer(cfg.moe, cfg.mlp_dim, cfg.mlp_activations, cfg.jnp_dtype, cfg.dropout_rate,
                    name="mlp")(h, token_mask, deterministic=deterministic)
  return layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.jnp_dtype, cfg.dropout_rate,
                         expert, name="mlp")(h, deterministic=deterministic)


def _remat(layer: type[nn.Module], cfg: T5Config, static_argnums: tuple[int, ...]) -> type[nn.Module]:
  """`layer` under the config's rematerialization policy (`T5Config.remat_policy`).

  `static_argnums` count `self` as 0 and name the Python flags (`deterministic`, `decode`)."""
  if cfg.remat_policy == "none":
    return layer
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            if cfg.remat_policy == "minimal" else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(layer, policy=policy, static_argnums=static_argnums)


class EncoderLayer(nn.Module):
  config: T5Config
  expert: Optional[ExpertSet] = None
  sparse: bool = False  # a Mixture-of-Experts feed-forward

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool = True,
               token_mask: Optional[Array] = None) -> Array:
    cfg = self.config
    dropout = _dropout(cfg)
    h = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, self.expert, name="pre_attention_layer_norm")(x)
    h = layers.MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.jnp_dtype, cfg.dropout_rate,
                                  self.expert, name="attention")(
                                      h, h, bias, deterministic=deterministic)
    h = _sublayer_output(self, "attention", h)
    x = x + dropout(h, deterministic=deterministic)
    h = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, self.expert, name="pre_mlp_layer_norm")(x)
    h = _feed_forward(cfg, self.sparse, self.expert, h, token_mask, deterministic)
    h = _sublayer_output(self, "mlp", h)
    x = x + dropout(h, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config
  expert: Optional[ExpertSet] = None
  sparse: bool = False  # a Mixture-of-Experts feed-forward

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
               deterministic: bool = True, decode: bool = False,
               token_mask: Optional[Array] = None) -> Array:
    cfg = self.config
    dropout = _dropout(cfg)
    attention = lambda name: layers.MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, cfg.jnp_dtype, cfg.dropout_rate, self.expert, name=name)
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, self.expert, name=name)
    h = norm("pre_self_attention_layer_norm")(x)
    h = attention("self_attention")(h, h, self_bias, decode=decode, deterministic=deterministic)
    h = _sublayer_output(self, "self_attention", h)
    x = x + dropout(h, deterministic=deterministic)
    h = norm("pre_cross_attention_layer_norm")(x)
    h = attention("encoder_decoder_attention")(h, encoded, cross_bias, deterministic=deterministic)
    h = _sublayer_output(self, "encoder_decoder_attention", h)
    x = x + dropout(h, deterministic=deterministic)
    h = norm("pre_mlp_layer_norm")(x)
    h = _feed_forward(cfg, self.sparse, self.expert, h, token_mask, deterministic)
    h = _sublayer_output(self, "mlp", h)
    x = x + dropout(h, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  expert: Optional[ExpertSet] = None

  @nn.compact
  def __call__(self, tokens: Array, mask: Array, deterministic: bool = True,
               segment_ids: Optional[Array] = None) -> Array:
    """`segment_ids` [batch, length] (1, 2, ... per packed input, 0 = padding): several inputs
    packed in one row, each attending to itself only; None: one input per row."""
    cfg = self.config
    length = tokens.shape[1]
    x = self.shared_embedding(tokens)
    x = _dropout(cfg)(x, deterministic=deterministic)
    x = layers.constrain(x, ("batch", "length", "embed"))
    position_bias = layers.RelativePositionBias(
        cfg.num_heads, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        bidirectional=True, name="relpos_bias")(length, length)
    bias = position_bias + (_key_mask_bias(mask) if segment_ids is None
                            else _segment_bias(segment_ids, segment_ids))
    layer = _remat(EncoderLayer, cfg, static_argnums=(3,))
    for i in range(cfg.num_encoder_layers):
      x = layer(cfg, self.expert, cfg.is_sparse(i), name=f"layers_{i}")(
          x, bias, deterministic, mask)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, self.expert, name="encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  expert: Optional[ExpertSet] = None

  @nn.compact
  def __call__(self, encoded: Array, encoder_mask: Array, tokens: Array, *,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None, project: bool = True,
               encoder_segments: Optional[Array] = None, row_segments: Optional[Array] = None):
    """float32 logits [batch, length, vocab]; or, with `project=False`, (the final hidden
    states, scaled as the output projection takes them, [batch, length, embed]; that projection's
    kernel [embed, vocab], cut to the softmax's entries), for callers that project in pieces.

    Packed encoder rows: `encoder_segments` [kv_rows, enc_len] (`Encoder`'s segment ids) and
    `row_segments` [batch] (the segment each decoder row reads, the rows of one encoder row
    consecutive); without them every decoder row reads its whole (shared) encoder row."""
    cfg = self.config
    length = max_decode_length if decode else tokens.shape[1]
    x = self.shared_embedding(tokens)
    x = _dropout(cfg)(x, deterministic=deterministic)
    x = layers.constrain(x, ("batch", "length", "embed"))
    self_bias = layers.RelativePositionBias(
        cfg.num_heads, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        bidirectional=False, name="relpos_bias")(length, length)
    if not decode:
      causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
      self_bias = self_bias + jnp.where(causal, 0.0, layers.NEG_INF)[None, None]
    if encoder_segments is None:
      cross_bias = _key_mask_bias(encoder_mask)
    else:
      if decode:
        raise ValueError("Decoder: packed encoder rows (encoder_segments) are for teacher forcing, not decoding")
      cross_bias = _cross_segment_bias(encoder_segments, row_segments, tokens.shape[1])
    # MoE layers route real tokens only: the start token and non-padding targets (teacher
    # forcing); one step at a time when decoding.
    token_mask = None
    if cfg.moe is not None and not decode:
      token_mask = (tokens != cfg.pad_id) | (jnp.arange(tokens.shape[1]) == 0)[None, :]
    # Incremental decoding never differentiates, so its cache updates run un-rematerialized.
    layer = DecoderLayer if decode else _remat(DecoderLayer, cfg, static_argnums=(5, 6))
    for i in range(cfg.num_decoder_layers):
      x = layer(cfg, self.expert, cfg.is_sparse(i), name=f"layers_{i}")(
          x, encoded, self_bias, cross_bias, deterministic, decode, token_mask)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, self.expert, name="decoder_norm")(x)
    x = _dropout(cfg)(x, deterministic=deterministic)
    if cfg.logits_via_embedding:
      x = x * (cfg.emb_dim ** -0.5)
      kernel = self.shared_embedding.embedding.T
    else:
      kernel = layers.Kernel(name="logits_dense", shape=(cfg.emb_dim, cfg.vocab_size),
                             axes=("embed", "vocab"))()
    if cfg.softmax_vocab_size is not None:  # the entries past it are never predicted or scored
      kernel = kernel[:, :cfg.softmax_vocab_size]
    if not project:
      return x, kernel
    logits = jnp.dot(x.astype(cfg.jnp_dtype), kernel.astype(cfg.jnp_dtype))
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """T5 encoder-decoder. Parameters: `token_embedder`, `encoder`, `decoder` (T5X names).

  With `expert` (an `ExpertConfig`, or an `ExpertSet` of several kinds) every attention and
  dense feed-forward kernel and every sub-layer output passes through the experts' hooks
  (`models.experts`), which add their modules where their kinds say.
  """
  config: T5Config
  expert: Optional[ExpertConfig | ExpertSet] = None

  def setup(self):
    cfg = self.config
    expert = ExpertSet.of(self.expert)
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.jnp_dtype)
    self.encoder = Encoder(cfg, self.token_embedder, expert)
    self.decoder = Decoder(cfg, self.token_embedder, expert)

  def encode(self, encoder_input_tokens: Array, encoder_mask: Optional[Array] = None,
             deterministic: bool = True, segment_ids: Optional[Array] = None) -> Array:
    """[batch, enc_len] int -> [batch, enc_len, embed]. Padding (id 0) is masked by default;
    `segment_ids` packs several inputs in a row (see `Encoder`)."""
    if encoder_mask is None:
      encoder_mask = encoder_input_tokens != self.config.pad_id
    return self.encoder(encoder_input_tokens, encoder_mask, deterministic, segment_ids)

  def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array, *,
             deterministic: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None, project: bool = True,
             encoder_segments: Optional[Array] = None, row_segments: Optional[Array] = None):
    """Teacher-forced (or, with `decode=True`, one cached step of) decoding -> float32 logits
    (`project=False`: the hidden states and the output kernel; packed encoder rows:
    `encoder_segments`, `row_segments`; see `Decoder`)."""
    return self.decoder(encoded, encoder_mask, decoder_input_tokens, deterministic=deterministic,
                        decode=decode, max_decode_length=max_decode_length, project=project,
                        encoder_segments=encoder_segments, row_segments=row_segments)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_mask: Optional[Array] = None, deterministic: bool = True) -> Array:
    """[batch, enc_len], [batch, dec_len] -> logits [batch, dec_len, vocab] (float32)."""
    if encoder_mask is None:
      encoder_mask = encoder_input_tokens != self.config.pad_id
    encoded = self.encode(encoder_input_tokens, encoder_mask, deterministic)
    return self.decode(encoded, encoder_mask, decoder_input_tokens, deterministic=deterministic)


def init_params(config: T5Config, rng: jax.Array, encoder_length: int = 8,
                decoder_length: int = 8, expert: Optional[ExpertConfig | ExpertSet] = None):
  """Randomly initialised parameters (boxed with logical axes) for `config` (and `expert`)."""
  model = Transformer(config, expert)
  tokens = jnp.ones((1, encoder_length), jnp.int32)
  dec = jnp.ones((1, decoder_length), jnp.int32)
  return model.init(rng, tokens, dec)["params"]


@functools.lru_cache(maxsize=None)
def param_shapes(config: T5Config) -> dict:
  """The nested dict of parameter shapes (tuples) of `config`'s backbone in the T5X layout,
  derived from the model itself (no arrays are made): the contract every loader checks."""
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.PRNGKey(0))))
  return _in_layout_order(jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes))


# The order of the T5X layout (what a reader of a checkpoint sees first); names not listed, and
# the numbered layers between `*_norm` and `logits_dense`, follow in natural order.
_LAYOUT_ORDER = {name: i for i, name in enumerate((
    "token_embedder", "encoder", "decoder", "embedding", "relpos_bias", "rel_embedding",
    "encoder_norm", "decoder_norm", "pre_attention_layer_norm", "attention",
    "pre_self_attention_layer_norm", "self_attention", "pre_cross_attention_layer_norm",
    "encoder_decoder_attention", "pre_mlp_layer_norm", "mlp", "query", "key", "value", "out",
    "router", "expert", "wi", "wi_0", "wi_1", "wo", "kernel", "scale"))}


def _in_layout_order(tree):
  """Keys in the T5X layout's order (`_LAYOUT_ORDER`; layers_2 before layers_10), so that
  checks report the first mismatch where a reader of the layout looks first."""
  if not isinstance(tree, dict):
    return tree
  def key(name):
    prefix, _, number = name.rpartition("_")
    if prefix == "layers" and number.isdigit():
      return (len(_LAYOUT_ORDER), int(number), name)
    return (_LAYOUT_ORDER.get(name, len(_LAYOUT_ORDER) + 1), 0, name)
  return {k: _in_layout_order(tree[k]) for k in sorted(tree, key=key)}


def logical_axes(config: T5Config, expert: Optional[ExpertConfig | ExpertSet] = None):
  """The logical axis names of every parameter, as a tree of `PartitionSpec`s."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), expert=expert))
  return nn.get_partition_spec(shapes)
