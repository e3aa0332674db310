"""Routed scoring and decoding (evaluation/routed_scoring.py): a forced expert gives that
expert's one-pass scores and its own decoded tokens, one compiled program per batch shape, and a
mesh with experts split over `expert` gives the one-device results."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import expert_stack, partitioning
from elm_jax.evaluation import expert_decoding, rank_scoring, routed_scoring
from elm_jax.models import routing
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params

NUM_EXPERTS = 3


def _examples(vocab_size, rng):
  """7 examples with 2-4 choices of different lengths (ragged on purpose)."""
  return [rank_scoring.Example(rng.integers(3, vocab_size, rng.integers(3, 30)).tolist(),
                               [rng.integers(3, vocab_size, rng.integers(1, 9)).tolist() for _ in range(2 + n % 3)])
          for n in range(7)]


@pytest.fixture(scope="module", params=["adapter", "lora"])
def setup(request, tiny_config):
  config = ExpertConfig(kind=request.param, reduction_factor=4, lora_targets=("query", "value", "wo"))
  model = EncoderDecoderModel.build(tiny_config, config)
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  backbone, stacked = model.init_experts(pretrained, NUM_EXPERTS, seed=1, shared_init=False)
  rng = np.random.default_rng(7)
  stacked = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.2, x.shape).astype(np.float32), stacked)
  examples = _examples(tiny_config.vocab_size, np.random.default_rng(0))
  one_pass, _, _ = rank_scoring.score_all_experts(model, backbone, stacked, examples, batch_size=4,
                                                  pack=False)
  return model, backbone, stacked, examples, one_pass


def test_forced_expert_gives_its_one_pass_scores(setup):
  model, backbone, stacked, examples, one_pass = setup
  for e in range(NUM_EXPERTS):
    forced = routing.RoutingInputs(routing.forced_weights(len(examples), NUM_EXPERTS, e))
    scores, counts, _ = routed_scoring.score_routed(model, backbone, stacked, examples, forced, batch_size=4)
    finite = np.isfinite(one_pass[e])
    assert np.array_equal(np.isfinite(scores), finite)
    # Not bitwise: the one-pass scorer runs the backbone vmapped over experts, the routed pass once,
    # with the E changes as one batched product (LoRA: x W + s (x a) b, not x (W + s a b)); float32
    # rounding of |score| up to ~60: worst seen 1.5e-5 absolute (a few ulps).
    np.testing.assert_allclose(scores[finite], one_pass[e][finite], rtol=2e-6, atol=5e-5)
  assert np.abs(one_pass[0][finite] - one_pass[1][finite]).max() > 0.1  # the experts differ


def test_forced_among_e_experts_is_bitwise_that_expert_routed_alone(setup):
  """The other experts add exactly nothing: every example forced to expert e among E scores
  bitwise as a stack of expert e alone, routed the same way (the comparison with the one-pass
  scorer above is to float32 rounding: it runs the backbone vmapped over experts)."""
  model, backbone, stacked, examples, _ = setup
  for e in range(NUM_EXPERTS):
    among, _, _ = routed_scoring.score_routed(model, backbone, stacked, examples, routing.RoutingInputs(
        routing.forced_weights(len(examples), NUM_EXPERTS, e)), batch_size=4)
    alone, _, _ = routed_scoring.score_routed(model, backbone, expert_stack.take(stacked, [e]), examples,
                                              routing.RoutingInputs(routing.forced_weights(len(examples), 1, 0)),
                                              batch_size=4)
    np.testing.assert_array_equal(among, alone)


def test_gathering_each_examples_experts_equals_computing_every_expert(setup, tiny_config):
  """Per-example weights on 2 of 3 experts, one example a batch: 2 x 1 < 3, so the scorer and the
  decoder gather each example's 2 experts; scores equal computing all 3 (float32 rounding),
  decoded tokens are equal, and a forced expert gathered scores as its one-pass scores."""
  model, backbone, stacked, examples, one_pass = setup
  rng = np.random.default_rng(5)
  weights = np.zeros((len(examples), NUM_EXPERTS), np.float32)
  for n in range(len(examples)):
    weights[n, rng.choice(NUM_EXPERTS, 2, replace=False)] = [0.7, 0.3]
  mixed = routing.RoutingInputs(weights)
  assert mixed.gather_size(1) == 2 and mixed.gather_size(2) == 0
  gathered, _, scorer = routed_scoring.score_routed(model, backbone, stacked, examples, mixed, batch_size=1)
  every, _, every_scorer = routed_scoring.score_routed(model, backbone, stacked, examples, mixed, batch_size=1,
                                                       gather=False)
  assert scorer.gathered == 2 and every_scorer.gathered == 0
  finite = np.isfinite(every)
  assert np.array_equal(np.isfinite(gathered), finite)
  np.testing.assert_allclose(gathered[finite], every[finite], rtol=2e-6, atol=5e-5)
  uniform, _, _ = routed_scoring.score_routed(model, backbone, stacked, examples, routing.RoutingInputs(
      routing.uniform_weights(len(examples), NUM_EXPERTS)), batch_size=1)
  assert np.abs(uniform[finite] - gathered[finite]).max() > 1e-3  # the weights matter
  forced, _, _ = routed_scoring.score_routed(model, backbone, stacked, examples, routing.RoutingInputs(
      routing.forced_weights(len(examples), NUM_EXPERTS, 1)), batch_size=1)
  np.testing.assert_allclose(forced[finite], one_pass[1][finite], rtol=2e-6, atol=5e-5)
  inputs = _inputs(examples, tiny_config.eos_id)
  decoded = [routed_scoring.decode_routed(model, backbone, stacked, inputs, mixed, batch_size=1, max_decode_length=6,
                                          input_bucket=32, gather=gather) for gather in (True, False)]
  assert decoded[0] == decoded[1]
  # On a mesh (experts split over `expert`, padded 3 -> 4): the same gathered mixture.
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=1, expert=4, model=2))
  split, _, split_scorer = routed_scoring.score_routed(model, backbone, stacked, examples, mixed, batch_size=1,
                                                       partitioner=partitioner)
  assert split_scorer.gathered == 2
  np.testing.assert_allclose(split[finite], gathered[finite], rtol=1e-5, atol=1e-5)


def test_one_program_per_batch_shape(setup):
  model, backbone, stacked, examples, _ = setup
  arrow = routing.RoutingInputs(routing.uniform_weights(len(examples), NUM_EXPERTS),
                                routing.arrow_routers(model.expert, stacked))
  jitted = routed_scoring.routed_choice_log_likelihoods
  jitted.clear_cache()
  _, _, scorer = routed_scoring.score_routed(model, backbone, stacked, examples, arrow, top_k=2, batch_size=4)
  assert jitted._cache_size() == len(scorer.shapes_compiled) == 2  # two batch shapes, E experts in each
  routed_scoring.score_routed(model, backbone, stacked, examples[::-1], arrow, top_k=2, batch_size=4)
  assert jitted._cache_size() == 2  # the same shapes again: nothing new compiled


@pytest.mark.parametrize("mesh", [dict(data=2, expert=4, model=1), dict(data=1, expert=2, model=4)])
def test_experts_split_over_the_expert_axis_equal_one_device(setup, mesh):
  model, backbone, stacked, examples, _ = setup
  arrow = routing.RoutingInputs(routing.uniform_weights(len(examples), NUM_EXPERTS),
                                routing.arrow_routers(model.expert, stacked))
  alone, _, _ = routed_scoring.score_routed(model, backbone, stacked, examples, arrow, top_k=2, batch_size=4)
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(**mesh))
  split, _, scorer = routed_scoring.score_routed(model, backbone, stacked, examples, arrow, top_k=2,
                                                 batch_size=4, partitioner=partitioner)
  assert scorer.expert_chunk == 4  # 3 experts padded to the axis with an expert of weight 0
  finite = np.isfinite(alone)
  assert np.array_equal(np.isfinite(split), finite)
  # Not bitwise (partitioned matmuls sum in another order): relative to |score| as in test_expert_scoring.
  np.testing.assert_allclose(split[finite], alone[finite], rtol=1e-5, atol=1e-5)


def test_refusals(setup):
  model, backbone, stacked, examples, _ = setup
  with pytest.raises(routing.RoutingError, match="routing weights are for 2 experts, the stack holds 3"):
    routed_scoring.score_routed(model, backbone, stacked, examples,
                                routing.RoutingInputs(routing.uniform_weights(len(examples), 2)))
  with pytest.raises(routing.RoutingError, match="routing weights are for 3 examples, got 7"):
    routed_scoring.score_routed(model, backbone, stacked, examples,
                                routing.RoutingInputs(routing.uniform_weights(3, NUM_EXPERTS)))


def _inputs(examples, eos_id):
  return [ex.inputs + [eos_id] for ex in examples]


@pytest.mark.parametrize("beam_size", [1, 2])
def test_routed_decoding_forced_is_the_experts_own_decoding(setup, tiny_config, beam_size):
  """Every example forced to expert e decodes as expert e alone (`decode_all_experts`, the same
  batch): the tokens equal (a top-2 margin within float32 rounding would break a tie, as in
  test_expert_scoring's decoding test); the uniform mixture decodes otherwise."""
  model, backbone, stacked, examples, _ = setup
  inputs = _inputs(examples, tiny_config.eos_id)
  tokens = np.zeros((8, 32), np.int32)
  for r, ids in enumerate(inputs):
    tokens[r, :len(ids)] = ids
  alone, _ = expert_decoding.decode_all_experts(model, backbone, stacked, tokens, max_decode_length=6,
                                                beam_size=beam_size)
  alone = np.asarray(alone)
  eos, pad = tiny_config.eos_id, tiny_config.pad_id
  routed_scoring.routed_predictions.clear_cache()

  def cut(seq):
    seq = seq.tolist()
    seq = seq[:seq.index(eos)] if eos in seq else seq
    return [t for t in seq if t != pad]

  for e in range(NUM_EXPERTS):
    forced = routing.RoutingInputs(routing.forced_weights(len(inputs), NUM_EXPERTS, e))
    routed = routed_scoring.decode_routed(model, backbone, stacked, inputs, forced, batch_size=8,
                                          max_decode_length=6, beam_size=beam_size, input_bucket=32)
    assert routed == [cut(alone[e, r]) for r in range(len(inputs))]
  uniform = routing.RoutingInputs(routing.uniform_weights(len(inputs), NUM_EXPERTS))
  mixed = routed_scoring.decode_routed(model, backbone, stacked, inputs, uniform, batch_size=8,
                                       max_decode_length=6, beam_size=beam_size, input_bucket=32)
  assert len(mixed) == len(inputs) and any(mixed[r] != cut(alone[0, r]) for r in range(len(inputs)))
  assert routed_scoring.routed_predictions._cache_size() == 1  # 4 routings, one batch shape: one program


def test_routed_decoding_on_a_mesh_equals_one_device(setup, tiny_config):
  """Arrow per token, experts split over the `expert` axis (3 padded to 4), rows over `data`:
  the same tokens as on one device."""
  model, backbone, stacked, examples, _ = setup
  inputs = _inputs(examples, tiny_config.eos_id)
  arrow = routing.RoutingInputs(routing.uniform_weights(len(inputs), NUM_EXPERTS),
                                routing.arrow_routers(model.expert, stacked))
  alone = routed_scoring.decode_routed(model, backbone, stacked, inputs, arrow, top_k=2, batch_size=4,
                                       max_decode_length=6)
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=4, model=1))
  split = routed_scoring.decode_routed(model, backbone, stacked, inputs, arrow, top_k=2, batch_size=4,
                                       max_decode_length=6, partitioner=partitioner)
  assert split == alone and any(alone)
