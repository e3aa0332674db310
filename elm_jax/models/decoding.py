"""Incremental decoding with a KV cache: greedy and beam search, with a maximum length and EOS stop.

Both take an encoded batch once and run the decoder one token at a time inside a
`lax.while_loop`, so the whole search is one compiled program.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from elm_jax.models.t5 import Transformer

Array = jax.Array
_NEG = -1.0e9


def _init_cache(model: Transformer, params, encoded: Array, encoder_mask: Array, length: int,
                collections: Optional[dict] = None):
  """Zeroed KV cache for a batch of `encoded.shape[0]` sequences of `length` decoder steps."""
  def make():
    _, variables = model.apply(
        {"params": params, **(collections or {})}, encoded, encoder_mask,
        jnp.zeros((encoded.shape[0], length), jnp.int32),
        decode=True, max_decode_length=length, method=Transformer.decode, mutable=["cache"])
    return variables["cache"]
  shapes = jax.eval_shape(make)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step(model: Transformer, params, cache, encoded, encoder_mask, tokens: Array, length: int,
          collections: Optional[dict] = None):
  """One decoder step: tokens [batch] -> (log-probs [batch, vocab] float32, new cache)."""
  logits, variables = model.apply(
      {"params": params, "cache": cache, **(collections or {})}, encoded, encoder_mask, tokens[:, None],
      decode=True, max_decode_length=length, method=Transformer.decode, mutable=["cache"])
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length"))
def greedy_decode(model: Transformer, params, encoder_input_tokens: Array, *,
                  max_decode_length: int, collections: Optional[dict] = None) -> tuple[Array, Array]:
  """Greedy decoding. Returns tokens [batch, max_decode_length] (pad after EOS) and the sum of
  the chosen tokens' log-probabilities [batch]. `collections`: variables beside `params` (a
  routed model's `experts` and `routing`, `models/routing.py`)."""
  cfg = model.config
  mask = encoder_input_tokens != cfg.pad_id
  encoded = model.apply({"params": params, **(collections or {})}, encoder_input_tokens, mask,
                        method=Transformer.encode)
  batch = encoder_input_tokens.shape[0]
  cache = _init_cache(model, params, encoded, mask, max_decode_length, collections)

  def cond(state):
    i, _, _, _, finished, _ = state
    return (i < max_decode_length) & ~jnp.all(finished)

  def body(state):
    i, out, cache, previous, finished, total = state
    logp, cache = _step(model, params, cache, encoded, mask, previous, max_decode_length, collections)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    total = total + jnp.where(finished, 0.0, jnp.take_along_axis(logp, token[:, None], -1)[:, 0])
    token = jnp.where(finished, cfg.pad_id, token)
    out = out.at[:, i].set(token)
    return i + 1, out, cache, token, finished | (token == cfg.eos_id), total

  state = (jnp.array(0), jnp.full((batch, max_decode_length), cfg.pad_id, jnp.int32), cache,
           jnp.full((batch,), cfg.decoder_start_id, jnp.int32), jnp.zeros((batch,), jnp.bool_),
           jnp.zeros((batch,), jnp.float32))
  _, out, _, _, _, total = jax.lax.while_loop(cond, body, state)
  return out, total


class _BeamState(NamedTuple):
  step: Array            # []
  live_seqs: Array       # [batch, beams, length]
  live_logp: Array       # [batch, beams]
  finished_seqs: Array   # [batch, beams, length]
  finished_scores: Array  # [batch, beams]
  cache: Any             # leaves [batch * beams, ...]


def _gather_beams(tree, indices: Array, batch: int, beams: int):
  """Reorders leaves [batch * beams, ...] (or [batch, beams, ...]) by indices [batch, beams]."""
  def gather(x):
    if x.ndim == 0:
      return x
    flat = x.shape[0] == batch * beams
    y = x.reshape(batch, beams, *x.shape[1:]) if flat else x
    y = jnp.take_along_axis(y, indices.reshape(batch, beams, *([1] * (y.ndim - 2))), axis=1)
    return y.reshape(x.shape) if flat else y
  return jax.tree_util.tree_map(gather, tree)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "beam_size"))
def beam_search(model: Transformer, params, encoder_input_tokens: Array, *, beam_size: int,
                max_decode_length: int, length_penalty: float = 1.0,
                collections: Optional[dict] = None) -> tuple[Array, Array]:
  """Beam search. A finished hypothesis of n tokens (EOS included) with log-probability s scores
  s / n**length_penalty; hypotheses still alive at the maximum length are scored the same way.
  Returns the best tokens [batch, max_decode_length] (pad after EOS) and their scores [batch].
  `collections` as `greedy_decode`'s (an example's beams are its consecutive decoder rows, so
  a routed example's weights reach each of them).
  """
  cfg = model.config
  batch, k, length = encoder_input_tokens.shape[0], beam_size, max_decode_length
  mask = encoder_input_tokens != cfg.pad_id
  encoded = model.apply({"params": params, **(collections or {})}, encoder_input_tokens, mask,
                        method=Transformer.encode)
  encoded = jnp.repeat(encoded, k, axis=0)
  mask = jnp.repeat(mask, k, axis=0)
  cache = _init_cache(model, params, encoded, mask, length, collections)
  lengths = jnp.arange(1, length + 1, dtype=jnp.float32) ** length_penalty

  def cond(state: _BeamState):
    best_possible = jnp.max(state.live_logp, axis=1) / lengths[-1]
    worst_finished = jnp.min(state.finished_scores, axis=1)
    done = jnp.all(worst_finished >= best_possible)
    return (state.step < length) & ~done

  def body(state: _BeamState):
    i = state.step
    previous = jnp.where(i == 0, cfg.decoder_start_id,
                         jax.lax.dynamic_index_in_dim(state.live_seqs, i - 1, axis=2, keepdims=False))
    logp, cache = _step(model, params, state.cache, encoded, mask, previous.reshape(-1), length, collections)
    vocab = logp.shape[-1]
    candidates = (state.live_logp[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)
    beam_index, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(state.live_seqs, beam_index[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], i, axis=2)
    is_eos = token == cfg.eos_id
    # Live beams: the best k candidates that did not end.
    live_rank = jnp.where(is_eos, _NEG, top_logp)
    live_logp, live_pick = jax.lax.top_k(live_rank, k)
    live_seqs = jnp.take_along_axis(seqs, live_pick[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(beam_index, live_pick, axis=1), batch, k)
    # Finished: merge the candidates that ended with those found before; keep the best k.
    new_scores = jnp.where(is_eos, top_logp / lengths[i], _NEG)
    all_seqs = jnp.concatenate([state.finished_seqs, seqs], axis=1)
    all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
    finished_scores, pick = jax.lax.top_k(all_scores, k)
    finished_seqs = jnp.take_along_axis(all_seqs, pick[:, :, None], axis=1)
    return _BeamState(i + 1, live_seqs, live_logp, finished_seqs, finished_scores, cache)

  init_logp = jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (batch, 1))
  pad = jnp.full((batch, k, length), cfg.pad_id, jnp.int32)
  state = _BeamState(jnp.array(0), pad, init_logp, pad, jnp.full((batch, k), _NEG), cache)
  state = jax.lax.while_loop(cond, body, state)
  # Beams alive when the loop stopped compete with the finished ones at their current length.
  steps = jnp.maximum(state.step, 1)
  live_scores = state.live_logp / lengths[steps - 1]
  live_scores = jnp.where(state.live_logp > _NEG / 2, live_scores, _NEG)
  all_seqs = jnp.concatenate([state.finished_seqs, state.live_seqs], axis=1)
  all_scores = jnp.concatenate([state.finished_scores, live_scores], axis=1)
  best = jnp.argmax(all_scores, axis=1)
  tokens = jnp.take_along_axis(all_seqs, best[:, None, None], axis=1)[:, 0]
  return tokens, jnp.take_along_axis(all_scores, best[:, None], axis=1)[:, 0]
