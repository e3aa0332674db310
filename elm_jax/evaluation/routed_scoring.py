"""Routed rank classification: E experts mixed per token or per example (`models/routing.py`)
score answer choices in one compiled program per batch shape.

`score_routed` is `rank_scoring.score_all_experts` for a routed mixture: the same batches (length
buckets, choices split over rows of at most MAX_CHOICES_PER_ROW, results in the examples' order),
one program for all E experts (never chunked: the router sees every expert at every token), and
on a mesh the experts split over the `expert` axis (padded to a multiple of it with experts of
weight 0), batch rows over `data`, the backbone by the model rules. It returns [N, C] scores:
one mixture, not one row per expert. Inputs are not packed two to a row (each encoder row must
be one example, whose weights its rows take). `score_routed_instances` takes instance dicts as
`expert_eval.score_instances` does; every expert reads inputs cut at `max_input_length`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from elm_jax import defaults, expert_stack, partitioning
from elm_jax.errors import UserInputError
from elm_jax.evaluation import rank_scoring
from elm_jax.expert_stack import ExpertsOnBackbone
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.routing import RoutedExperts, RoutingError, RoutingInputs, routed_backbone

Array = jax.Array


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
               max_target_length: int = defaults.MAX_TARGET_LENGTH):
    if model.expert is None:
      raise RoutingError("routing needs experts: the model was built without expert configurations")
    num = expert_stack.num_experts(experts)
    if routing.num_experts != num:
      raise RoutingError(f"routing weights are for {routing.num_experts} experts, the stack holds {num}")
    self.plain_model, self.routing = model, routing
    routed = EncoderDecoderModel.build(model.config, RoutedExperts.over(model.expert, top_k, temperature))
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
      variables = self.routing.variables(a.examples, total)
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
                 max_target_length: int = defaults.MAX_TARGET_LENGTH) -> tuple[np.ndarray, np.ndarray, RoutedScorer]:
  """The experts (leaves [E, ...] over `backbone`, of `model`'s configurations) routed as
  `routing` says (its example weights [N, E] in the order of `examples`) on every example:
  (scores [N, C] float32, -inf on padded choices; token counts [N, C] int32; the scorer)."""
  if len(routing.example_weights) != len(examples):
    raise RoutingError(f"routing weights are for {len(routing.example_weights)} examples, got {len(examples)}")
  if jax.process_count() > 1 and partitioner is None:
    raise RoutingError("routed scoring over several processes needs a mesh (--mesh) spanning them")
  scorer = RoutedScorer(model, backbone, experts, routing, top_k=top_k, temperature=temperature,
                        partitioner=partitioner, batch_size=batch_size, max_input_length=max_input_length,
                        max_target_length=max_target_length)
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
