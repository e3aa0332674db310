"""Routed scoring (evaluation/routed_scoring.py): a forced expert gives that expert's one-pass
scores, one compiled program per batch shape, and a mesh with experts split over `expert`
gives the one-device results."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import partitioning
from elm_jax.evaluation import rank_scoring, routed_scoring
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
    # Not bitwise: the routed pass computes the E experts' changes as one batched product and adds
    # 1 x its change (LoRA: x W + s (x a) b, not x (W + s a b)); float32 rounding of |score| up to
    # ~60: worst seen 1.5e-5 absolute.
    np.testing.assert_allclose(scores[finite], one_pass[e][finite], rtol=2e-6, atol=5e-5)
  assert np.abs(one_pass[0][finite] - one_pass[1][finite]).max() > 0.1  # the experts differ


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
