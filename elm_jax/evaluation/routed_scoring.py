"""Routed rank classification: E experts mixed per token or per example (`models/routing.py`)
score answer choices in one compiled program per batch shape.

`score_routed` is `rank_scoring.score_all_experts` for a routed mixture: the same batches (length
buckets, choices split over rows of at most MAX_CHOICES_PER_ROW, results in the examples' order),
one program for all E experts (never chunked: the router sees every expert at every token; with
per-example weights on a library larger than a batch's examples x their experts, each
example's experts are gathered and only theirs computed, `RoutingInputs.gather_size`), and
on a mesh the experts split over the `expert` axis (padded to a multiple of it with experts of
weight 0), batch rows over `data`, the backbone by the model rules. It returns [N, C] scores:
one mixture, not one row per expert. Inputs are not packed two to a row (each encoder row must
be one example, whose weights its rows take). `score_routed_instances` takes instance dicts as
`expert_eval.score_instances` does; every expert reads inputs cut at `max_input_length`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from elm_jax import batching, defaults, expert_stack, partitioning
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_decoding, rank_scoring
from elm_jax.expert_stack import ExpertsOnBackbone
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.routing import RoutedExperts, RoutingError, RoutingInputs, routed_backbone

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "beam_size"))
def routed_predictions(model: EncoderDecoderModel, backbone, experts, routing, encoder_tokens: Array, *,
                       max_decode_length: int, beam_size: int = 1) -> tuple[Array, Array]:
  """`EncoderDecoderModel.routed_predictions`, compiled: experts' leaves [E, ...], the
  `routing` collection of the batch, encoder_tokens [N, Li] -> (tokens [N, max_decode_length],
  scores [N])."""
  return model.routed_predictions(backbone, experts, routing, encoder_tokens, max_decode_length=max_decode_length,
                                  beam_size=beam_size)


@functools.partial(jax.jit, static_argnames=("model",))
def routed_choice_log_likelihoods(model: EncoderDecoderModel, backbone, experts, routing, encoder_tokens: Array,
                                  choice_targets: Array, encoder_segments: Optional[Array] = None,
                                  scored_positions: Optional[Array] = None) -> Array:
  """`EncoderDecoderModel.routed_choice_log_likelihoods`, compiled: experts' leaves [E, ...],
  the `routing` collection of the batch, encoder_tokens [N, Li], choice_targets [N, C, Lt] ->
  [N, C] float32."""
  return model.routed_choice_log_likelihoods(backbone, experts, routing, encoder_tokens, choice_targets,
                                             encoder_segments, scored_positions)


class RoutedScorer(rank_scoring.RankScorer):
  """`RankScorer` for experts routed as `routing` says: `model` is the experts' own (built with
  their `ExpertSet`), `experts` their stacked leaves [E, ...] over `backbone`; per-token routers
  keep `top_k` experts a token with softmax(score / `temperature`) weights. Each example's
  scores come back as [1, num_choices]."""

  def __init__(self, model: EncoderDecoderModel, backbone, experts, routing: RoutingInputs, *,
               top_k: int = 1, temperature: float = 1.0, partitioner=None,
               batch_size: int = defaults.BATCH_SIZE, max_input_length: int = defaults.MAX_INPUT_LENGTH,
               max_target_length: int = defaults.MAX_TARGET_LENGTH, gather: bool = True):
    if model.expert is None:
      raise RoutingError("routing needs experts: the model was built without expert configurations")
    num = expert_stack.num_experts(experts)
    if routing.num_experts != num:
      raise RoutingError(f"routing weights are for {routing.num_experts} experts, the stack holds {num}")
    self.plain_model, self.routing = model, routing
    self.gathered = routing.gather_size(batch_size) if gather else 0
    routed = EncoderDecoderModel.build(model.config, RoutedExperts.over(model.expert, top_k, temperature,
                                                                        gathered=self.gathered))
    super().__init__(routed, routed_backbone(routed, backbone, experts), experts=experts, expert_chunk=num,
                     partitioner=partitioner, batch_size=batch_size, max_input_length=max_input_length,
                     max_target_length=max_target_length, pack=False)

  def _place_backbone(self) -> None:
    self._expert_specs = self.plain_model.expert_specs()[1]
    self.params = self.partitioner.place(self.params, self.model.param_specs())

  def _compile_ahead(self, arrays) -> None:
    """Routed programs compile at their first call (one per batch shape)."""

  def _score_with_experts(self, arrays) -> list[np.ndarray]:
    """[1, batch, choices] per batch: the mixture of all experts, in one program."""
    total = self.expert_chunk  # every expert, padded to a multiple of the mesh's expert axis
    experts = expert_stack.take(self.experts, np.minimum(np.arange(total), self.num_experts - 1))
    experts = expert_stack.place(experts, self.partitioner, self._expert_specs)
    results = []
    for a in arrays:
      variables = self.routing.variables(a.examples, total, self.gathered)
      if self.partitioner is None:
        out = routed_choice_log_likelihoods(self.model, self.params, experts, variables, *a.arguments)
      else:
        with self.partitioner.context():
          out = routed_choice_log_likelihoods(self.model, self.params, experts, variables, *a.arguments)
      results.append(out)
    return [partitioning.to_host(out)[None] for out in results]


def score_routed(model: EncoderDecoderModel, backbone, experts, examples: Sequence[rank_scoring.Example],
                 routing: RoutingInputs, *, top_k: int = 1, temperature: float = 1.0,
                 batch_size: int = defaults.BATCH_SIZE, partitioner=None,
                 max_input_length: int = defaults.MAX_INPUT_LENGTH,
                 max_target_length: int = defaults.MAX_TARGET_LENGTH, gather: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, RoutedScorer]:
  """The experts (leaves [E, ...] over `backbone`, of `model`'s configurations) routed as
  `routing` says (its example weights [N, E] in the order of `examples`) on every example:
  (scores [N, C] float32, -inf on padded choices; token counts [N, C] int32; the scorer).
  `gather=False` computes every expert's change even where gathering would cost less."""
  if len(routing.example_weights) != len(examples):
    raise RoutingError(f"routing weights are for {len(routing.example_weights)} examples, got {len(examples)}")
  if jax.process_count() > 1 and partitioner is None:
    raise RoutingError("routed scoring over several processes needs a mesh (--mesh) spanning them")
  scorer = RoutedScorer(model, backbone, experts, routing, top_k=top_k, temperature=temperature,
                        partitioner=partitioner, batch_size=batch_size, max_input_length=max_input_length,
                        max_target_length=max_target_length, gather=gather)
  num_choices = max((len(ex.choices) for ex in examples), default=0)
  scores = np.full((len(examples), num_choices), -np.inf, np.float32)
  counts = np.zeros((len(examples), num_choices), np.int32)
  if examples:
    per_example, per_counts = scorer.score(examples)
    for n, (s, c) in enumerate(zip(per_example, per_counts)):
      scores[n, :s.shape[-1]] = s[0]
      counts[n, :len(c)] = c
  return scores, counts, scorer


def tokenized(loaded: ExpertsOnBackbone, rows: Sequence[dict[str, Any]], source: str = "instances"
              ) -> list[rank_scoring.Example]:
  """Instance dicts {"inputs", "answer_choices", ...} -> tokenized examples; an instance
  without answer choices is refused, naming it."""
  vocabulary = loaded.vocabulary()
  examples = []
  for i, row in enumerate(rows):
    if not row.get("answer_choices"):
      raise UserInputError(f"{source}: instance {i} has no answer choices; rank scoring needs them")
    examples.append(rank_scoring.Example(vocabulary.encode(row["inputs"]),
                                         vocabulary.encode_batch(row["answer_choices"])))
  return examples


def score_routed_instances(loaded: ExpertsOnBackbone, rows: Sequence[dict[str, Any]], routing: RoutingInputs, *,
                           top_k: int = 1, temperature: float = 1.0, batch_size: int = defaults.BATCH_SIZE,
                           partitioner=None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                           max_target_length: int = defaults.MAX_TARGET_LENGTH,
                           source: str = "instances") -> tuple[np.ndarray, np.ndarray]:
  """`score_routed` of the loaded experts on instance dicts: (scores [N, C], token counts [N, C])."""
  scores, counts, scorer = score_routed(loaded.model, loaded.backbone, loaded.stack.params,
                                        tokenized(loaded, rows, source), routing, top_k=top_k,
                                        temperature=temperature, batch_size=batch_size, partitioner=partitioner,
                                        max_input_length=max_input_length, max_target_length=max_target_length)
  scorer.truncated.report(max_input_length, max_target_length)
  return scores, counts


def decode_routed(model: EncoderDecoderModel, backbone, experts, inputs: Sequence[Sequence[int]],
                  routing: RoutingInputs, *, top_k: int = 1, temperature: float = 1.0,
                  batch_size: int = defaults.BATCH_SIZE, partitioner=None,
                  max_decode_length: int = defaults.MAX_TARGET_LENGTH, beam_size: int = 1,
                  input_bucket: int = expert_decoding.GENERATION_MIN_INPUT_BUCKET,
                  gather: bool = True) -> list[list[int]]:
  """The experts (leaves [E, ...] over `backbone`, of `model`'s configurations) routed as
  `routing` says (example weights [N, E] in the order of `inputs`) decoding every input (token
  ids, EOS included, already cut): each input's tokens up to EOS (excluded), in input order.
  One compiled decoding program per input-length bucket, all E experts inside; on a mesh the
  experts split over the `expert` axis (padded to a multiple of it with experts of weight 0),
  batch rows over `data`. `gather` as `score_routed`'s."""
  num = expert_stack.num_experts(experts)
  if routing.num_experts != num:
    raise RoutingError(f"routing weights are for {routing.num_experts} experts, the stack holds {num}")
  if len(routing.example_weights) != len(inputs):
    raise RoutingError(f"routing weights are for {len(routing.example_weights)} examples, got {len(inputs)}")
  gathered = routing.gather_size(batch_size) if gather else 0
  routed = EncoderDecoderModel.build(model.config, RoutedExperts.over(model.expert, top_k, temperature,
                                                                      gathered=gathered))
  params, total = routed_backbone(routed, backbone, experts), num
  if partitioner is not None:
    ways = partitioner.mesh.shape["expert"]
    total = -(-num // ways) * ways
    params = partitioner.place(params, routed.param_specs())
  stacked = expert_stack.take(experts, np.minimum(np.arange(total), num - 1))
  if partitioner is not None:
    stacked = expert_stack.place(stacked, partitioner, model.expert_specs()[1])
  eos, pad = model.config.eos_id, model.config.pad_id
  out: list[list[int]] = [[] for _ in inputs]
  batches, pending = list(batching.padded_batches(list(inputs), batch_size, input_bucket)), []
  for rows, tokens in batches:  # every batch is dispatched before any is read back
    variables = routing.variables(list(rows) + [None] * (len(tokens) - len(rows)), total, gathered)
    with partitioner.context() if partitioner is not None else contextlib.nullcontext():
      pending.append(routed_predictions(routed, params, stacked, variables, tokens,
                                        max_decode_length=max_decode_length, beam_size=beam_size)[0])
  for (rows, _), decoded in zip(batches, pending):
    decoded = partitioning.to_host(decoded)
    for r, i in enumerate(rows):
      seq = decoded[r].tolist()
      seq = seq[:seq.index(eos)] if eos in seq else seq
      out[i] = [t for t in seq if t != pad]
  return out


def decode_routed_instances(loaded: ExpertsOnBackbone, rows: Sequence[dict[str, Any]], routing: RoutingInputs, *,
                            top_k: int = 1, temperature: float = 1.0, batch_size: int = defaults.BATCH_SIZE,
                            partitioner=None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                            max_decode_length: int = defaults.MAX_TARGET_LENGTH, beam_size: int = 1) -> list[str]:
  """`decode_routed` of the loaded experts on instance dicts (their `inputs`, cut at
  `max_input_length` with EOS kept, as `expert_decoding.decode_texts` cuts them): one text each."""
  vocabulary = loaded.vocabulary()
  eos = loaded.config.eos_id
  ids = [vocabulary.encode(r["inputs"])[:max_input_length - 1] + [eos] for r in rows]
  decoded = decode_routed(loaded.model, loaded.backbone, loaded.stack.params, ids, routing, top_k=top_k,
                          temperature=temperature, batch_size=batch_size, partitioner=partitioner,
                          max_decode_length=max_decode_length, beam_size=beam_size)
  return [vocabulary.decode(tokens) for tokens in decoded]
