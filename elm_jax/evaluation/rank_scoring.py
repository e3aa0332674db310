"""Rank classification: the log-likelihood of each answer choice given the input (T0/ELM protocol).

A choice's score is the sum of log-softmax probabilities of its tokens plus EOS, teacher-forced,
given the input tokens plus EOS; the prediction is the argmax over choices. Inputs are padded to
bucketed shapes (batch fixed; lengths and choice counts rounded up to powers of two) so a run
compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models.t5 import Transformer

Array = jax.Array


def shift_right(targets: Array, start_id: int) -> Array:
  """Decoder inputs from targets [..., length]: start token, then targets[..., :-1]."""
  start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)


def token_log_likelihoods(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target] per position: [..., length, vocab], [..., length] -> [..., length]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def choice_log_likelihoods(model: Transformer, params, encoder_tokens: Array,
                           choice_targets: Array) -> Array:
  """Sum of target-token log-probabilities for every choice.

  encoder_tokens [N, Li] (0 = padding, EOS included), choice_targets [N, C, Lt] (EOS included,
  0 = padding) -> [N, C] float32. Each input is encoded once and shared by its C choices.
  """
  cfg = model.config
  n, c, lt = choice_targets.shape
  mask = encoder_tokens != cfg.pad_id
  encoded = model.apply({"params": params}, encoder_tokens, mask, method=Transformer.encode)
  encoded = jnp.repeat(encoded, c, axis=0)
  mask = jnp.repeat(mask, c, axis=0)
  targets = choice_targets.reshape(n * c, lt)
  logits = model.apply({"params": params}, encoded, mask, shift_right(targets, cfg.decoder_start_id),
                       method=Transformer.decode)
  per_token = token_log_likelihoods(logits, targets) * (targets != cfg.pad_id)
  return per_token.sum(axis=-1).reshape(n, c)


def bucket(length: int, minimum: int, maximum: Optional[int] = None) -> int:
  """The smallest power of two >= length (at least `minimum`, at most `maximum`)."""
  size = minimum
  while size < length:
    size *= 2
  return min(size, maximum) if maximum else size


@dataclasses.dataclass
class Example:
  """One rank-classification example, tokenized (ids without EOS)."""
  inputs: list[int]
  choices: list[list[int]]


@dataclasses.dataclass
class TruncationReport:
  inputs: int = 0
  choices: int = 0

  def report(self, max_input_length: int, max_target_length: int, stream=None) -> None:
    stream = stream or sys.stderr
    if self.inputs:
      print(f"note: {self.inputs} input(s) longer than {max_input_length} tokens (EOS included) "
            "were truncated", file=stream)
    if self.choices:
      print(f"note: {self.choices} choice(s) longer than {max_target_length} tokens (EOS included) "
            "were truncated", file=stream)


class RankScorer:
  """Scores tokenized examples in fixed-size, length-bucketed batches."""

  def __init__(self, model: Transformer, params, *, batch_size: int = 32,
               max_input_length: int = 512, max_target_length: int = 128):
    if batch_size < 1:
      raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    self.model, self.params = model, params
    self.batch_size = batch_size
    self.max_input_length, self.max_target_length = max_input_length, max_target_length
    self.truncated = TruncationReport()
    self.shapes_compiled: set[tuple[int, int, int, int]] = set()

  def _with_eos(self, ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    eos = self.model.config.eos_id
    if len(ids) + 1 > limit:
      return list(ids[:limit - 1]) + [eos], True
    return list(ids) + [eos], False

  def score(self, examples: Sequence[Example]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per example: (scores [num_choices] float32, token counts [num_choices] int32)."""
    prepared = []
    for ex in examples:
      inputs, cut = self._with_eos(ex.inputs, self.max_input_length)
      self.truncated.inputs += cut
      choices = []
      for choice in ex.choices:
        ids, cut = self._with_eos(choice, self.max_target_length)
        self.truncated.choices += cut
        choices.append(ids)
      prepared.append((inputs, choices))
    # Similar lengths batch together; results go back in the original order.
    order = sorted(range(len(prepared)), key=lambda i: (len(prepared[i][0]), len(prepared[i][1])))
    scores: list = [None] * len(prepared)
    counts: list = [None] * len(prepared)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      batch_scores = self._score_batch([prepared[i] for i in chunk])
      for row, i in enumerate(chunk):
        num = len(prepared[i][1])
        scores[i] = batch_scores[row, :num]
        counts[i] = np.array([len(c) for c in prepared[i][1]], np.int32)
    return scores, counts

  def _score_batch(self, batch: Sequence[tuple[list[int], list[list[int]]]]) -> np.ndarray:
    li = bucket(max(len(x) for x, _ in batch), 16, self.max_input_length)
    c = bucket(max(len(ch) for _, ch in batch), 2)
    lt = bucket(max(len(t) for _, ch in batch for t in ch), 8, self.max_target_length)
    inputs = np.zeros((self.batch_size, li), np.int32)
    targets = np.zeros((self.batch_size, c, lt), np.int32)
    for row, (x, choices) in enumerate(batch):
      inputs[row, :len(x)] = x
      for j, t in enumerate(choices):
        targets[row, j, :len(t)] = t
    self.shapes_compiled.add((self.batch_size, li, c, lt))
    return np.asarray(choice_log_likelihoods(self.model, self.params, inputs, targets))


def predictions(scores: Iterable[np.ndarray]) -> list[int]:
  """Argmax per example (the first maximum on ties)."""
  return [int(np.argmax(s)) for s in scores]
