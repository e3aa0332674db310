"""Rank classification: the log-likelihood of each answer choice given the input (T0/ELM protocol).

A choice's score is the sum of log-softmax probabilities of its tokens plus EOS, teacher-forced,
given the input tokens plus EOS; the prediction is the argmax over choices. Inputs are padded to
bucketed shapes (batch fixed; lengths and choice counts rounded up to powers of two) so a run
compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models.adapters import merge_params
from elm_jax.models.t5 import Transformer

Array = jax.Array
CPU_EXPERT_CHUNK = 2
# Smallest padded input and choice lengths. Every distinct batch shape is one compilation
# (about 2 s on a 2-core CPU even for the demo's 2-layer model; far more for XL on an accelerator), while padding a
# short input to 64 tokens or a short choice to 16 costs little: coarse buckets mean few
# programs (the demo's held-out and seen prompts: 4 shapes per model instead of 8).
MIN_INPUT_BUCKET = 64
MIN_TARGET_BUCKET = 16
# Choices scored in one row of a batch: an example with more is split over several rows (its
# input encoded once per row), so memory stays that of batch_size x 16 choices however many
# choices an example has (10,000 choices in one row needed 38.7 GB).
MAX_CHOICES_PER_ROW = 16


def shift_right(targets: Array, start_id: int) -> Array:
  """Decoder inputs from targets [..., length]: start token, then targets[..., :-1]."""
  start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)


def token_log_likelihoods(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target] per position: [..., length, vocab], [..., length] -> [..., length]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def _choice_scores(model: Transformer, params, encoder_tokens: Array, choice_targets: Array) -> Array:
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


@functools.partial(jax.jit, static_argnames=("model",))
def choice_log_likelihoods(model: Transformer, params, encoder_tokens: Array,
                           choice_targets: Array) -> Array:
  """Sum of target-token log-probabilities for every choice.

  encoder_tokens [N, Li] (0 = padding, EOS included), choice_targets [N, C, Lt] (EOS included,
  0 = padding) -> [N, C] float32. Each input is encoded once and shared by its C choices.
  """
  return _choice_scores(model, params, encoder_tokens, choice_targets)


@functools.partial(jax.jit, static_argnames=("model",))
def expert_choice_log_likelihoods(model: Transformer, backbone, experts, encoder_tokens: Array,
                                  choice_targets: Array) -> Array:
  """`choice_log_likelihoods` for every expert at once: experts' leaves [E, ...] on a shared
  backbone; encoder_tokens [N, Li], choice_targets [N, C, Lt] -> [E, N, C] float32."""
  def one(expert):
    return _choice_scores(model, merge_params(backbone, expert), encoder_tokens, choice_targets)
  return jax.vmap(one)(experts)


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
  """Scores tokenized examples in fixed-size, length-bucketed batches.

  With `experts` (a tree of stacked expert parameters, leaves [E, ...]), `params` is the frozen
  backbone and every expert scores every batch in one vmapped program, `expert_chunk` experts at
  a time (default: all on an accelerator, CPU_EXPERT_CHUNK on CPU; the last chunk is padded by
  repeating an expert, so one program serves all chunks). With
  a `partitioner`, each chunk is split over the mesh's `expert` axis and the backbone by the
  model rules; `expert_chunk` must then be a multiple of the `expert` axis size.
  """

  def __init__(self, model: Transformer, params, *, experts=None, expert_chunk: Optional[int] = None,
               partitioner=None, batch_size: int = 32, max_input_length: int = 512,
               max_target_length: int = 128):
    if batch_size < 1:
      raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    self.model, self.params, self.experts = model, params, experts
    self.num_experts = None if experts is None else int(jax.tree_util.tree_leaves(experts)[0].shape[0])
    if experts is not None:
      expert_chunk = min(expert_chunk or default_expert_chunk(self.num_experts), self.num_experts)
      if partitioner is not None:
        ways = partitioner.mesh.shape["expert"]
        expert_chunk = -(-expert_chunk // ways) * ways
      if expert_chunk < 1:
        raise ValueError(f"expert_chunk: expected a positive integer, got {expert_chunk}")
    self.expert_chunk = expert_chunk
    self.partitioner = partitioner
    self.batch_size = batch_size
    self.max_input_length, self.max_target_length = max_input_length, max_target_length
    self.truncated = TruncationReport()
    self.shapes_compiled: set[tuple[int, ...]] = set()
    if partitioner is not None:
      self._place_backbone()

  def _with_eos(self, ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    eos = self.model.config.eos_id
    if len(ids) + 1 > limit:
      return list(ids[:limit - 1]) + [eos], True
    return list(ids) + [eos], False

  def score(self, examples: Sequence[Example]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per example: (scores [num_choices], or [experts, num_choices] with experts; float32,
    token counts [num_choices] int32)."""
    prepared, owners = [], []  # rows of at most MAX_CHOICES_PER_ROW choices; owners: example index
    for n, ex in enumerate(examples):
      inputs, cut = self._with_eos(ex.inputs, self.max_input_length)
      self.truncated.inputs += cut
      choices = []
      for choice in ex.choices:
        ids, cut = self._with_eos(choice, self.max_target_length)
        self.truncated.choices += cut
        choices.append(ids)
      for start in range(0, max(len(choices), 1), MAX_CHOICES_PER_ROW):
        prepared.append((inputs, choices[start:start + MAX_CHOICES_PER_ROW]))
        owners.append(n)
    # Similar lengths batch together; results go back in the original order.
    order = sorted(range(len(prepared)), key=lambda i: (len(prepared[i][0]), len(prepared[i][1])))
    batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
    arrays = [self._pad_batch([prepared[i] for i in chunk]) for chunk in batches]
    self._compile_ahead(arrays)
    if self.experts is None:
      # Dispatch every batch first; reading results back is the only host sync.
      results = [choice_log_likelihoods(self.model, self.params, *a) for a in arrays]
      results = [np.asarray(r) for r in results]
    else:
      results = self._score_with_experts(arrays)
    row_scores: list = [None] * len(prepared)
    for chunk, batch_scores in zip(batches, results):
      for row, i in enumerate(chunk):
        row_scores[i] = batch_scores[..., row, :len(prepared[i][1])]
    scores: list[list] = [[] for _ in examples]
    counts: list[list] = [[] for _ in examples]
    for i, n in enumerate(owners):  # rows of one example are consecutive, in choice order
      scores[n].append(row_scores[i])
      counts[n].extend(len(c) for c in prepared[i][1])
    return ([np.concatenate(s, axis=-1) for s in scores],
            [np.asarray(c, np.int32) for c in counts])

  def _pad_batch(self, batch: Sequence[tuple[list[int], list[list[int]]]]) -> tuple[np.ndarray, np.ndarray]:
    li = bucket(max(len(x) for x, _ in batch), MIN_INPUT_BUCKET, self.max_input_length)
    c = bucket(max(len(ch) for _, ch in batch), 2)
    lt = bucket(max(len(t) for _, ch in batch for t in ch), MIN_TARGET_BUCKET, self.max_target_length)
    inputs = np.zeros((self.batch_size, li), np.int32)
    targets = np.zeros((self.batch_size, c, lt), np.int32)
    for row, (x, choices) in enumerate(batch):
      inputs[row, :len(x)] = x
      for j, t in enumerate(choices):
        targets[row, j, :len(t)] = t
    self.shapes_compiled.add((self.expert_chunk or 0, self.batch_size, li, c, lt))
    return inputs, targets

  def _compile_ahead(self, arrays) -> None:
    """Compiles the programs for every batch shape of `arrays` at once, on parallel threads
    (XLA compiles outside the GIL): a run with several new shapes waits for about the slowest
    compile rather than their sum. Shapes compiled before cost nothing (JAX's cache). With a
    partitioner the programs compile at their first call, under the mesh."""
    shapes = sorted({(inputs.shape, targets.shape) for inputs, targets in arrays})
    if len(shapes) < 2 or self.partitioner is not None:
      return
    spec = lambda shape: jax.ShapeDtypeStruct(shape, np.int32)
    if self.experts is None:
      lower = lambda s: choice_log_likelihoods.lower(self.model, self.params, spec(s[0]), spec(s[1]))
    else:
      chunk = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct((self.expert_chunk,) + np.shape(x)[1:],
                                         jax.dtypes.canonicalize_dtype(x.dtype)), self.experts)
      lower = lambda s: expert_choice_log_likelihoods.lower(self.model, self.params, chunk, spec(s[0]),
                                                            spec(s[1]))
    workers = min(len(shapes), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="elm-jax-compile") as pool:
      list(pool.map(lambda s: lower(s).compile(), shapes))

  def _score_with_experts(self, arrays) -> list[np.ndarray]:
    """[experts, batch, choices] per batch; experts are the outer loop so each chunk of expert
    parameters is moved to the device once."""
    results: list[list] = [[] for _ in arrays]
    for start, stop, chunk in expert_chunks(self.experts, self.expert_chunk):
      chunk = self._place_experts(chunk)
      for k, (inputs, targets) in enumerate(arrays):
        if self.partitioner is None:
          out = expert_choice_log_likelihoods(self.model, self.params, chunk, inputs, targets)
        else:
          with self.partitioner.context():
            out = expert_choice_log_likelihoods(self.model, self.params, chunk, inputs, targets)
        results[k].append((out, stop - start))
    return [np.concatenate([np.asarray(out)[:n] for out, n in parts], axis=0) for parts in results]

  def _place_backbone(self) -> None:
    from elm_jax.models.adapters import split_params
    from elm_jax.models.t5 import logical_axes
    specs = logical_axes(self.model.config, self.model.expert)
    if self.experts is None:
      self.params = self.partitioner.place(self.params, specs)
      return
    backbone_specs, expert_specs = split_params(specs, self.model.expert)
    from elm_jax.training.train_step import stacked_expert_specs
    self.params = self.partitioner.place(self.params, backbone_specs)
    self._expert_specs = stacked_expert_specs(expert_specs)

  def _place_experts(self, chunk):
    if self.partitioner is None:
      return jax.device_put(chunk)
    return self.partitioner.place(chunk, self._expert_specs)


def default_expert_chunk(num_experts: int) -> int:
  """All experts in one program on accelerators; CPU_EXPERT_CHUNK on CPU, where small chunks
  keep the per-expert activations in cache (BENCHMARKS.md: chunks of 16 ran 1.3-2x slower than 2)."""
  return min(CPU_EXPERT_CHUNK if jax.default_backend() == "cpu" else num_experts, num_experts)


def expert_chunks(experts, chunk: int):
  """Yields (start, stop, chunk) over stacked experts (leaves [E, ...]): chunk leaves are
  [chunk, ...] host arrays, the last chunk padded by repeating the last expert so every chunk
  has one shape (and one compiled program)."""
  num_experts = int(jax.tree_util.tree_leaves(experts)[0].shape[0])
  for start in range(0, num_experts, chunk):
    index = np.minimum(np.arange(start, start + chunk), num_experts - 1)
    yield start, min(start + chunk, num_experts), jax.tree_util.tree_map(lambda x: np.asarray(x)[index], experts)


def score_all_experts(model: Transformer, backbone, experts, examples: Sequence[Example], *,
                      batch_size: int = 32, expert_chunk: Optional[int] = None, partitioner=None,
                      max_input_length: int = 512, max_target_length: int = 128,
                      ) -> tuple[np.ndarray, np.ndarray, "RankScorer"]:
  """Every expert on every example in one vmapped pass per (expert chunk, batch).

  experts: leaves [E, ...]; examples: N examples with ragged choice counts. Returns
  (scores [E, N, C] float32, the sum of choice-token log-probabilities with -inf where example n
  has fewer than C choices; token counts [N, C] int32, 0 on padding; the scorer, for its reports).
  """
  scorer = RankScorer(model, backbone, experts=experts, expert_chunk=expert_chunk,
                      partitioner=partitioner, batch_size=batch_size,
                      max_input_length=max_input_length, max_target_length=max_target_length)
  per_example, per_counts = scorer.score(examples)
  num_choices = max((len(ex.choices) for ex in examples), default=0)
  scores = np.full((scorer.num_experts, len(examples), num_choices), -np.inf, np.float32)
  counts = np.zeros((len(examples), num_choices), np.int32)
  for n, (s, c) in enumerate(zip(per_example, per_counts)):
    scores[:, n, :s.shape[-1]] = s
    counts[n, :len(c)] = c
  return scores, counts, scorer


def predictions(scores: Iterable[np.ndarray]) -> list[int]:
  """Argmax per example (the first maximum on ties)."""
  return [int(np.argmax(s)) for s in scores]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "beam_size"))
def decode_all_experts(model: Transformer, backbone, experts, encoder_tokens: Array, *,
                       max_decode_length: int, beam_size: int = 1) -> tuple[Array, Array]:
  """Greedy (beam_size 1) or beam decoding by every expert at once: experts' leaves [E, ...],
  encoder_tokens [N, Li] -> (tokens [E, N, max_decode_length], scores [E, N])."""
  from elm_jax.models import decoding

  def one(expert):
    params = merge_params(backbone, expert)
    if beam_size == 1:
      return decoding.greedy_decode(model, params, encoder_tokens, max_decode_length=max_decode_length)
    return decoding.beam_search(model, params, encoder_tokens, beam_size=beam_size,
                                max_decode_length=max_decode_length)
  return jax.vmap(one)(experts)
