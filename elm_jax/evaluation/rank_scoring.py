"""Rank classification: the log-likelihood of each answer choice given the input (T0/ELM protocol).

A choice's score is the sum of log-softmax probabilities of its tokens plus EOS, teacher-forced,
given the input tokens plus EOS; the prediction is the argmax over choices. Inputs are padded to
bucketed shapes (batch fixed; lengths on `batching.cost_bucket`'s ladder, choice counts on powers
of two) so a run compiles a handful of programs, not one per batch. A batch whose inputs differ
widely in length packs them in pairs, the shortest with the longest, two to an encoder row
(`pack_pairs`), when that saves at least PACK_MIN_SAVING of the encoder's positions.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from typing import Iterable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from elm_jax import batching, defaults, expert_stack, partitioning
from elm_jax.models.model import EncoderDecoderModel

Array = jax.Array
CPU_EXPERT_CHUNK = 2
# Padded lengths: inputs and choices go to `batching.cost_bucket`'s ladder (at most 1/8
# padding), inputs at least 16 tokens. A power-of-two floor of 16 target tokens made 1-5 token
# answer choices pay 3-4x their decoder and softmax work, and a 65-token input twice its encoder
# (bench/head_to_head.py); the few more shapes compile once and stay in JAX's compilation cache.
MIN_INPUT_BUCKET = 16
MIN_TARGET_BUCKET = 1
# Models smaller than this (backbone parameters) pad to powers of two instead: their batches
# take milliseconds, so a program compiled for one more shape costs more than the padding it
# saves (`./elm demo --quick`, 0.2M parameters: 212 s on an empty compilation cache with the
# fine ladder; see BENCHMARKS.md).
FINE_LADDER_PARAMETERS = 10_000_000
# Choices scored in one row of a batch: an example with more is split over several rows (its
# input encoded once per row), so memory stays that of batch_size x 16 choices however many
# choices an example has (10,000 choices in one row needed 38.7 GB).
MAX_CHOICES_PER_ROW = 16
# Pack a batch's inputs two to an encoder row when that removes at least this share of the
# encoder's padded positions (32 inputs of 17-64 tokens: 16 rows of 88 instead of 32 of 64, 31%
# fewer); the packed row's longer self-attention costs a little of the saving back.
PACK_MIN_SAVING = 1 / 8


def length_rungs(config) -> int:
  """Lengths per doubling of the padding ladder for `config`'s model (`batching.cost_bucket`):
  8 (at most 1/8 padding), or 1 (powers of two) below FINE_LADDER_PARAMETERS (the backbone's)."""
  backbone = EncoderDecoderModel.build(config).abstract_params()[0]
  parameters = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(backbone))
  return 8 if parameters >= FINE_LADDER_PARAMETERS else 1


@dataclasses.dataclass
class PaddedBatch:
  """One batch as the compiled scorer takes it: `inputs` [rows, Li] (two inputs a row when
  `segments` [rows, Li] is set, see `EncoderDecoderModel.choice_log_likelihoods`), `targets`
  [batch_size, C, Lt], `scored` [K] (the flat indices of the targets' real tokens, K on the
  cost ladder, padded with the targets' size), and `order`: for each target row, the position
  in the batch of the example it holds (None: a padding row)."""
  inputs: np.ndarray
  segments: Optional[np.ndarray]
  targets: np.ndarray
  scored: np.ndarray
  order: list[Optional[int]]
  # For each target row, the index (in `RankScorer.score`'s examples) of the example it holds
  # (None: a padding row): what a routed scorer weights each row by (`routed_scoring.py`).
  examples: Optional[list[Optional[int]]] = None

  @property
  def arguments(self) -> tuple:
    return (self.inputs, self.targets, self.segments, self.scored)

  @property
  def shapes(self) -> tuple:
    return (self.inputs.shape, self.segments is not None, self.targets.shape, self.scored.shape)


def pack_pairs(lengths: Sequence[int], batch_size: int, min_input_bucket: int, max_input_length: int,
               rungs: int = 8) -> Optional[tuple[int, list[tuple[Optional[int], Optional[int]]]]]:
  """(packed row length, pairs of batch positions, None for an empty slot) when packing the
  inputs of `lengths` (a batch of at most `batch_size`, EOS included) two to a row saves at
  least PACK_MIN_SAVING of the encoder's positions; else None. Row r holds the r-th shortest
  and the r-th longest input, so every row is about as long as the shortest plus the longest."""
  if batch_size < 2 or batch_size % 2 or not lengths:
    return None
  order: list[Optional[int]] = [None] * (batch_size - len(lengths))
  order += sorted(range(len(lengths)), key=lambda i: lengths[i])
  size = lambda i: 0 if i is None else lengths[i]
  pairs = [(order[r], order[batch_size - 1 - r]) for r in range(batch_size // 2)]
  packed = batching.cost_bucket(max(size(a) + size(b) for a, b in pairs), min_input_bucket, 2 * max_input_length,
                                rungs)
  unpacked = batching.cost_bucket(max(lengths), min_input_bucket, max_input_length, rungs)
  if (batch_size // 2) * packed > (1 - PACK_MIN_SAVING) * batch_size * unpacked:
    return None
  return packed, pairs


@functools.partial(jax.jit, static_argnames=("model",))
def choice_log_likelihoods(model: EncoderDecoderModel, params, encoder_tokens: Array,
                           choice_targets: Array, encoder_segments: Optional[Array] = None,
                           scored_positions: Optional[Array] = None) -> Array:
  """`EncoderDecoderModel.choice_log_likelihoods`, compiled: encoder_tokens [N, Li],
  choice_targets [N, C, Lt] -> [N, C] float32 (packed inputs: with `encoder_segments`; only
  the tokens at `scored_positions` projected)."""
  return model.choice_log_likelihoods(params, encoder_tokens, choice_targets, encoder_segments,
                                      scored_positions)


@functools.partial(jax.jit, static_argnames=("model",))
def expert_choice_log_likelihoods(model: EncoderDecoderModel, backbone, experts, encoder_tokens: Array,
                                  choice_targets: Array, encoder_segments: Optional[Array] = None,
                                  scored_positions: Optional[Array] = None) -> Array:
  """`EncoderDecoderModel.expert_choice_log_likelihoods`, compiled: every expert at once,
  experts' leaves [E, ...] on a shared backbone; encoder_tokens [N, Li], choice_targets
  [N, C, Lt] -> [E, N, C] float32."""
  return model.expert_choice_log_likelihoods(backbone, experts, encoder_tokens, choice_targets,
                                             encoder_segments, scored_positions)


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

  `pack` (default: on, except for Mixture-of-Experts models, whose expert capacity depends on
  which tokens share a batch, and with a partitioner, whose data axis must split the rows)
  lets a batch of inputs of very different lengths pack two to an encoder row (`pack_pairs`).
  """

  def __init__(self, model: EncoderDecoderModel, params, *, experts=None, expert_chunk: Optional[int] = None,
               partitioner=None, batch_size: int = defaults.BATCH_SIZE,
               max_input_length: int = defaults.MAX_INPUT_LENGTH,
               max_target_length: int = defaults.MAX_TARGET_LENGTH, pack: Optional[bool] = None):
    if batch_size < 1:
      raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    self.model, self.params, self.experts = model, params, experts
    self.num_experts = None if experts is None else expert_stack.num_experts(experts)
    if experts is not None:
      expert_chunk = min(expert_chunk or default_expert_chunk(self.num_experts), self.num_experts)
      if partitioner is not None:
        ways = partitioner.mesh.shape["expert"]
        expert_chunk = -(-expert_chunk // ways) * ways
      if expert_chunk < 1:
        raise ValueError(f"expert_chunk: expected a positive integer, got {expert_chunk}")
    self.expert_chunk = expert_chunk
    self.partitioner = partitioner
    self.pack = (model.config.moe is None and partitioner is None) if pack is None else pack
    self.rungs = length_rungs(model.config)
    self.batch_size = batch_size
    self.max_input_length, self.max_target_length = max_input_length, max_target_length
    self.truncated = TruncationReport()
    self.shapes_compiled: set[tuple[int, ...]] = set()
    self._expert_specs = None
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
    batches = batching.length_sorted_batches([(len(x), len(c)) for x, c in prepared], self.batch_size)
    arrays = [self._pad_batch([prepared[i] for i in chunk]) for chunk in batches]
    for chunk, padded in zip(batches, arrays):
      padded.examples = [None if p is None else owners[chunk[p]] for p in padded.order]
    self._compile_ahead(arrays)
    if self.experts is None:
      # Dispatch every batch first; reading results back is the only host sync.
      results = [choice_log_likelihoods(self.model, self.params, *a.arguments) for a in arrays]
      results = [np.asarray(r) for r in results]
    else:
      results = self._score_with_experts(arrays)
    row_scores: list = [None] * len(prepared)
    for chunk, padded, batch_scores in zip(batches, arrays, results):
      for row, position in enumerate(padded.order):
        if position is not None:
          i = chunk[position]
          row_scores[i] = batch_scores[..., row, :len(prepared[i][1])]
    scores: list[list] = [[] for _ in examples]
    counts: list[list] = [[] for _ in examples]
    for i, n in enumerate(owners):  # rows of one example are consecutive, in choice order
      scores[n].append(row_scores[i])
      counts[n].extend(len(c) for c in prepared[i][1])
    return ([np.concatenate(s, axis=-1) for s in scores],
            [np.asarray(c, np.int32) for c in counts])

  def _pad_batch(self, batch: Sequence[tuple[list[int], list[list[int]]]]) -> PaddedBatch:
    c = batching.bucket(max(len(ch) for _, ch in batch), 2)
    lt = batching.cost_bucket(max(len(t) for _, ch in batch for t in ch), MIN_TARGET_BUCKET,
                              self.max_target_length, self.rungs)
    packing = (pack_pairs([len(x) for x, _ in batch], self.batch_size, MIN_INPUT_BUCKET, self.max_input_length,
                          self.rungs) if self.pack else None)
    if packing is None:
      li = batching.cost_bucket(max(len(x) for x, _ in batch), MIN_INPUT_BUCKET, self.max_input_length,
                                self.rungs)
      inputs, segments = batching.pad_rows([x for x, _ in batch], self.batch_size, li), None
      order: list[Optional[int]] = list(range(len(batch))) + [None] * (self.batch_size - len(batch))
    else:
      li, pairs = packing
      inputs = np.zeros((len(pairs), li), np.int32)
      segments = np.zeros_like(inputs)
      order = [position for pair in pairs for position in pair]
      for r, pair in enumerate(pairs):
        at = 0
        for s, position in enumerate(pair):
          if position is not None:
            ids = batch[position][0]
            inputs[r, at:at + len(ids)], segments[r, at:at + len(ids)] = ids, s + 1
            at += len(ids)
    targets = np.zeros((self.batch_size, c, lt), np.int32)
    for row, position in enumerate(order):
      if position is not None:
        choices = batch[position][1]
        targets[row, :len(choices)] = batching.pad_rows(choices, len(choices), lt)
    real = np.flatnonzero(targets.reshape(-1) != self.model.config.pad_id)
    scored = np.full(batching.cost_bucket(len(real), rungs=self.rungs), targets.size, np.int32)  # past the end: padding
    scored[:len(real)] = real
    # (expert chunk, encoder rows, input length, choices, choice length, projected tokens)
    self.shapes_compiled.add((self.expert_chunk or 0, len(inputs), li, c, lt, len(scored)))
    return PaddedBatch(inputs, segments, targets, scored, order)

  def _compile_ahead(self, arrays) -> None:
    """Compiles the programs for every batch shape of `arrays` at once, on parallel threads
    (XLA compiles outside the GIL): a run with several new shapes waits for about the slowest
    compile rather than their sum. Shapes compiled before cost nothing (JAX's cache). With a
    partitioner the programs compile at their first call, under the mesh."""
    shapes = sorted({a.shapes for a in arrays})
    if len(shapes) < 2 or self.partitioner is not None:
      return
    spec = lambda shape: jax.ShapeDtypeStruct(shape, np.int32)
    segments = lambda s: spec(s[0]) if s[1] else None
    if self.experts is None:
      lower = lambda s: choice_log_likelihoods.lower(self.model, self.params, spec(s[0]), spec(s[2]),
                                                     segments(s), spec(s[3]))
    else:
      chunk = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct((self.expert_chunk,) + np.shape(x)[1:],
                                         jax.dtypes.canonicalize_dtype(x.dtype)), self.experts)
      lower = lambda s: expert_choice_log_likelihoods.lower(self.model, self.params, chunk, spec(s[0]),
                                                            spec(s[2]), segments(s), spec(s[3]))
    workers = min(len(shapes), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="elm-jax-compile") as pool:
      list(pool.map(lambda s: lower(s).compile(), shapes))

  def _score_with_experts(self, arrays) -> list[np.ndarray]:
    """[experts, batch, choices] per batch; experts are the outer loop so each chunk of expert
    parameters is moved to the device once."""
    results: list[list] = [[] for _ in arrays]
    for start, stop, chunk in expert_stack.chunks(self.experts, self.expert_chunk):
      chunk = expert_stack.place(chunk, self.partitioner, self._expert_specs)
      for k, a in enumerate(arrays):
        if self.partitioner is None:
          out = expert_choice_log_likelihoods(self.model, self.params, chunk, *a.arguments)
        else:
          with self.partitioner.context():
            out = expert_choice_log_likelihoods(self.model, self.params, chunk, *a.arguments)
        results[k].append((out, stop - start))
    # Every process reads back the whole [chunk, batch, choices] (its devices may hold only some
    # experts' rows of a mesh spanning several processes).
    return [np.concatenate([partitioning.to_host(out)[:n] for out, n in parts], axis=0) for parts in results]

  def _place_backbone(self) -> None:
    backbone_specs, self._expert_specs = self.model.expert_specs()
    if self.experts is None:
      self.params = self.partitioner.place(self.params, self.model.param_specs())
      return
    self.params = self.partitioner.place(self.params, backbone_specs)


def default_expert_chunk(num_experts: int) -> int:
  """All experts in one program on accelerators; CPU_EXPERT_CHUNK on CPU, where small chunks
  keep the per-expert activations in cache (BENCHMARKS.md: chunks of 16 ran 1.3-2x slower than 2)."""
  return min(CPU_EXPERT_CHUNK if jax.default_backend() == "cpu" else num_experts, num_experts)


def score_all_experts(model: EncoderDecoderModel, backbone, experts, examples: Sequence[Example], *,
                      batch_size: int = defaults.BATCH_SIZE, expert_chunk: Optional[int] = None,
                      partitioner=None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                      max_target_length: int = defaults.MAX_TARGET_LENGTH, pack: Optional[bool] = None,
                      ) -> tuple[np.ndarray, np.ndarray, "RankScorer"]:
  """Every expert on every example in one vmapped pass per (expert chunk, batch).

  experts: leaves [E, ...]; examples: N examples with ragged choice counts. Returns
  (scores [E, N, C] float32, the sum of choice-token log-probabilities with -inf where example n
  has fewer than C choices; token counts [N, C] int32, 0 on padding; the scorer, for its reports).
  """
  scorer = RankScorer(model, backbone, experts=experts, expert_chunk=expert_chunk,
                      partitioner=partitioner, batch_size=batch_size,
                      max_input_length=max_input_length, max_target_length=max_target_length, pack=pack)
  num_choices = max((len(ex.choices) for ex in examples), default=0)
  processes, me = jax.process_count(), jax.process_index()
  if partitioner is not None or processes == 1:
    return (*padded_scores(scorer, examples, num_choices), scorer)
  # Several processes, each on its own devices: process p scores examples p, p + P, ...; the
  # results are gathered so that every process holds every (example, choice) once.
  share = -(-len(examples) // processes)
  local_scores, local_counts = padded_scores(scorer, examples[me::processes], num_choices, share)
  gathered_scores = np.asarray(multihost_utils.process_allgather(local_scores))   # [P, E, share, C]
  gathered_counts = np.asarray(multihost_utils.process_allgather(local_counts))   # [P, share, C]
  scores = np.full((scorer.num_experts, len(examples), num_choices), -np.inf, np.float32)
  counts = np.zeros((len(examples), num_choices), np.int32)
  for p in range(processes):
    n = len(examples[p::processes])
    scores[:, p::processes] = gathered_scores[p, :, :n]
    counts[p::processes] = gathered_counts[p, :n]
  return scores, counts, scorer


def padded_scores(scorer: "RankScorer", examples: Sequence[Example], num_choices: Optional[int] = None,
                  rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """(scores [E, rows, C] float32 with -inf padding, token counts [rows, C] int32, 0 on padding)
  of `examples` scored by `scorer`: E its experts, or 1 for a scorer without experts; C
  `num_choices` (default: the most choices of an example); rows default: len(examples)."""
  num_experts = 1 if scorer.num_experts is None else scorer.num_experts
  num_choices = max((len(ex.choices) for ex in examples), default=0) if num_choices is None else num_choices
  rows = len(examples) if rows is None else rows
  scores = np.full((num_experts, rows, num_choices), -np.inf, np.float32)
  counts = np.zeros((rows, num_choices), np.int32)
  if examples:
    per_example, per_counts = scorer.score(examples)
    for n, (s, c) in enumerate(zip(per_example, per_counts)):
      scores[:, n, :s.shape[-1]] = s
      counts[n, :len(c)] = c
  return scores, counts


def predictions(scores: Iterable[np.ndarray]) -> list[int]:
  """Argmax per example (the first maximum on ties)."""
  return [int(np.argmax(s)) for s in scores]
