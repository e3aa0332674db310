"""The model seam (t5x's `BaseModel`): what training, evaluation and retrieval ask of a T5.

`EncoderDecoderModel` wraps the Flax `Transformer` and defines, once, everything done with it:

- `loss`: token cross-entropy of a teacher-forced batch (plus the weighted router losses of a
  Mixture-of-Experts model), with its metrics;
- `choice_log_likelihoods`: rank classification, the sum of each answer choice's token
  log-probabilities (EOS included) given the input;
- `predict`: greedy or beam decoding with a KV cache;
- `encode_mean`: the mean-pooled, L2-normalised encoder output (retrieval by the backbone).

Every method takes the full parameter tree (backbone and expert merged: `adapters.merge_params`)
and is a pure function of its arrays, so callers jit or vmap it over experts with the model
as a static argument (it is hashable). The model knows nothing of meshes or optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from elm_jax.models import decoding
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.moe import router_losses_and_metrics
from elm_jax.models.t5 import Transformer
from elm_jax.models.t5_config import T5Config

Array = jax.Array
Batch = dict[str, Array]


def shift_right(targets: Array, start_id: int) -> Array:
  """Decoder inputs from targets [..., length]: the start token, then targets[..., :-1]."""
  start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)


VOCAB_CHUNK = 8192  # output-projection columns per piece in `projected_token_log_likelihoods`


def projected_token_log_likelihoods(hidden: Array, kernel: Array, targets: Array, dtype=jnp.float32,
                                    chunk: int = VOCAB_CHUNK) -> Array:
  """log softmax(hidden @ kernel)[target] per position, never holding the [..., vocab] logits:
  hidden [..., emb], kernel [emb, vocab], targets [...] -> [...] float32. The target's logit is
  the dot product with its kernel column; the log-sum-exp runs over `chunk` columns at a time
  with a running maximum (logits of one chunk at a time are alive: [..., chunk] float32)."""
  emb, vocab = kernel.shape
  hidden, kernel = hidden.astype(dtype), kernel.astype(dtype)
  target_logits = jnp.einsum("...e,...e->...", hidden, jnp.take(kernel.T, targets, axis=0),
                             preferred_element_type=jnp.float32)
  pieces = -(-vocab // chunk)
  if pieces == 1:
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return target_logits - jax.nn.logsumexp(logits, axis=-1)
  padded = jnp.pad(kernel, ((0, 0), (0, pieces * chunk - vocab))).reshape(emb, pieces, chunk)
  real = (jnp.arange(pieces * chunk) < vocab).reshape(pieces, chunk)

  def piece(carry, inputs):
    running_max, running_sum = carry
    columns, valid = inputs
    logits = jnp.where(valid, jnp.dot(hidden, columns, preferred_element_type=jnp.float32), -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
    return (new_max, running_sum), None
  start = (jnp.full(hidden.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(hidden.shape[:-1], jnp.float32))
  (running_max, running_sum), _ = jax.lax.scan(piece, start, (jnp.moveaxis(padded, 1, 0), real))
  return target_logits - (running_max + jnp.log(running_sum))


@jax.custom_vjp
def token_nll(logits: Array, targets: Array) -> tuple[Array, Array]:
  """logits [..., vocab], targets [...] -> (negative log-likelihood of each target [...] float32,
  whether the target's logit is a largest one [...] bool).

  The same numbers as `-log_softmax(logits)[target]`, with a hand-written gradient: the
  cotangent of the logits is `(softmax - one_hot(target)) * d_nll`, formed in one pass over the
  logits, where autodiff of log_softmax and take_along_axis builds a dense one-hot cotangent,
  scatters into it and then takes the softmax's backward on top. The second output spares the
  metric an argmax pass over the vocabulary; in an exact tie for the largest logit it counts the
  target as correct where argmax would pick the first. Measured in `bench/train_step_variants.py`."""
  return _token_nll_forward(logits, targets)[0]


def _token_nll_forward(logits: Array, targets: Array):
  x = logits.astype(jnp.float32)
  top = jnp.max(x, axis=-1)
  log_normalizer = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return (log_normalizer - target_logit, target_logit >= top), (logits, targets, log_normalizer)


def _token_nll_backward(residuals, cotangents):
  logits, targets, log_normalizer = residuals
  d_nll = cotangents[0]  # the second output is boolean: it has no cotangent
  one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
  d_logits = (jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None]) - one_hot) * d_nll[..., None]
  return d_logits.astype(logits.dtype), None


token_nll.defvjp(_token_nll_forward, _token_nll_backward)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array, Array]:
  """Token cross-entropy [batch, length, vocab] vs [batch, length] -> (mean loss over weighted
  tokens, correct-token count, token count). Mean over tokens, as the paper's HF loss."""
  nll, correct = token_nll(logits, targets)
  tokens = jnp.sum(weights)
  loss = jnp.sum(nll * weights) / jnp.maximum(tokens, 1.0)
  return loss, jnp.sum(correct * weights), tokens


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """A T5 (`module`) and the computations every part of elm_jax runs with it."""
  module: Transformer

  @classmethod
  def build(cls, config: T5Config, expert: Optional[ExpertConfig] = None) -> "EncoderDecoderModel":
    return cls(Transformer(config, expert))

  @property
  def config(self) -> T5Config:
    return self.module.config

  @property
  def expert(self) -> Optional[ExpertConfig]:
    return self.module.expert

  # ------------------------------------------------------------------ training
  def loss(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Loss of a batch ({encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
    [decoder_loss_weights]}, each [batch, length]) in training mode: dropout and router jitter
    draw from `dropout_rng` (needed only when they are on); Mixture-of-Experts layers use their
    training capacity and add their weighted router losses. Metrics: loss, token accuracy,
    tokens; for MoE also `cross_entropy`, the router losses and drop and load figures."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    inputs = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    moe = self.config.moe
    if moe is None:
      logits = self.module.apply({"params": params}, *inputs, deterministic=False, rngs=rngs)
    else:
      logits, state = self.module.apply({"params": params}, *inputs, deterministic=False, rngs=rngs,
                                        mutable=["intermediates"])
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0).astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, correct, tokens = cross_entropy(logits, targets, weights)
    metrics = {"loss": loss, "accuracy": correct / jnp.maximum(tokens, 1.0), "tokens": tokens}
    if moe is not None:
      # Switch load balancing + ST-MoE z-loss, weighted, on top of the cross-entropy.
      auxiliary, router_metrics = router_losses_and_metrics(state, moe)
      metrics.update(router_metrics, cross_entropy=loss)
      loss = loss + auxiliary
      metrics["loss"] = loss
    return loss, metrics

  # ------------------------------------------------------------------ evaluation
  def encode(self, params, encoder_tokens: Array, segment_ids: Optional[Array] = None) -> tuple[Array, Array]:
    """(encoder outputs [N, Li, emb], mask [N, Li]) of tokens [N, Li] (0 = padding; packed
    rows: `segment_ids`, see `Encoder`)."""
    mask = encoder_tokens != self.config.pad_id
    return self.module.apply({"params": params}, encoder_tokens, mask, segment_ids=segment_ids,
                             method=Transformer.encode), mask

  def choice_log_likelihoods(self, params, encoder_tokens: Array, choice_targets: Array,
                             encoder_segments: Optional[Array] = None,
                             scored_positions: Optional[Array] = None) -> Array:
    """encoder_tokens [N, Li] (EOS included, 0 = padding), choice_targets [N, C, Lt] (EOS
    included, 0 = padding) -> [N, C] float32: the sum of each choice's token log-probabilities,
    teacher-forced. Each input is encoded once and shared by its C choices.

    Packed inputs: encoder_tokens [R, P] hold S inputs a row, told apart by `encoder_segments`
    [R, P] (s + 1 for the row's s-th input, 0 = padding), and choice_targets [R x S, C, Lt] has
    the choices of row r's s-th input at r x S + s (an input absent from its row: all padding,
    scored 0). Scores equal the unpacked ones to float32 rounding; the encoder runs on R x P
    positions instead of R x S x (longest input).

    `scored_positions` [K] int32: the flat indices into choice_targets [N x C x Lt] of its
    non-padding tokens (in any order; entries of N x C x Lt or more are padding, ignored). Only
    those K positions go through the output projection and its log-softmax, the largest single
    cost of a short choice; None: all N x C x Lt."""
    cfg = self.config
    n, c, lt = choice_targets.shape
    encoded, mask = self.encode(params, encoder_tokens, encoder_segments)
    # The C choice rows of an input share its encoder output: cross-attention projects its keys
    # and values once per input, not once per choice (`MultiHeadAttention`'s shared rows).
    targets = choice_targets.reshape(n * c, lt)
    row_segments = None
    if encoder_segments is not None:
      per_row = n // encoder_tokens.shape[0]
      if per_row * encoder_tokens.shape[0] != n:
        raise ValueError(f"choice_log_likelihoods: {n} rows of choices cannot be {encoder_tokens.shape[0]} "
                         "packed input rows' inputs")
      row_segments = (jnp.arange(n * c) // c) % per_row + 1
    hidden, kernel = self.module.apply({"params": params}, encoded, mask,
                                       shift_right(targets, cfg.decoder_start_id), project=False,
                                       encoder_segments=encoder_segments, row_segments=row_segments,
                                       method=Transformer.decode)
    if scored_positions is None:
      scored_positions = jnp.arange(n * c * lt)
    flat_targets = jnp.take(targets.reshape(-1), scored_positions, mode="clip")
    per_token = projected_token_log_likelihoods(
        jnp.take(hidden.reshape(n * c * lt, -1), scored_positions, axis=0, mode="clip"), kernel, flat_targets,
        cfg.jnp_dtype)
    per_token = per_token * (flat_targets != cfg.pad_id)
    # Padding entries' rows (N x C or more) fall outside the segments: segment_sum drops them.
    return jax.ops.segment_sum(per_token, scored_positions // lt, num_segments=n * c).reshape(n, c)

  def predict(self, params, encoder_tokens: Array, *, max_decode_length: int,
              beam_size: int = 1) -> tuple[Array, Array]:
    """Greedy (beam_size 1) or beam decoding of encoder_tokens [N, Li] -> (tokens [N,
    max_decode_length], pad after EOS; scores [N])."""
    if beam_size == 1:
      return decoding.greedy_decode(self.module, params, encoder_tokens, max_decode_length=max_decode_length)
    return decoding.beam_search(self.module, params, encoder_tokens, beam_size=beam_size,
                                max_decode_length=max_decode_length)

  # ------------------------------------------------------------------ retrieval
  def encode_mean(self, params, tokens: Array) -> Array:
    """tokens [N, L] (0 = padding) -> the mean of the encoder outputs over real tokens,
    L2-normalised: [N, emb] float32."""
    hidden, mask = self.encode(params, tokens)
    weights = mask[..., None].astype(jnp.float32)
    pooled = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

