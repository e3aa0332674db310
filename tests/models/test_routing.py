"""Routing in the model (models/routing.py): Arrow's prototypes, the router's weights, a uniform
mixture of identical experts, the refusals, and the hooks' parity with each expert alone."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import expert_stack, tree_paths
from elm_jax.models import routing
from elm_jax.models.experts import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params

NUM_EXPERTS = 3
CONFIGS = {"adapter": ExpertConfig(kind="adapter", reduction_factor=4),
           "lora": ExpertConfig(kind="lora", lora_targets=("query", "value", "wo")),
           "ia3": ExpertConfig(kind="ia3")}


def _experts(tiny_config, kind):
  model = EncoderDecoderModel.build(tiny_config, CONFIGS[kind])
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  backbone, stacked = model.init_experts(pretrained, NUM_EXPERTS, seed=1, shared_init=False)
  rng = np.random.default_rng(7)  # experts that differ (LoRA's b starts at zero)
  stacked = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.2, x.shape).astype(np.float32), stacked)
  return model, backbone, stacked


@pytest.fixture(scope="module")
def batch(tiny_config):
  rng = np.random.default_rng(0)
  return rng.integers(3, tiny_config.vocab_size, (4, 10)).astype(np.int32), \
      rng.integers(3, tiny_config.vocab_size, (4, 2, 5)).astype(np.int32)


def _routed(model, backbone, stacked, inputs, batch, top_k=1, temperature=1.0):
  routed = EncoderDecoderModel.build(model.config, routing.RoutedExperts.over(model.expert, top_k, temperature))
  variables = inputs.variables(list(range(len(batch[0]))))
  return np.asarray(jax.jit(routed.routed_choice_log_likelihoods)(
      routing.routed_backbone(routed, backbone, stacked), stacked, variables, *batch))


def test_lora_prototypes_are_numpys_top_singular_vectors(tiny_config):
  _, _, stacked = _experts(tiny_config, "lora")
  routers = tree_paths.flatten(routing.arrow_routers(CONFIGS["lora"], stacked))
  flat = tree_paths.flatten(stacked)
  assert len(routers) == 6 * 2 + 4  # query and value of 6 attentions (2 encoder, 4 decoder); wo of 4 blocks
  for path, prototypes in routers.items():
    module = path[:-1]
    for e in range(NUM_EXPERTS):
      update = flat[module + ("lora_a",)][e].astype(np.float64) @ flat[module + ("lora_b",)][e]
      u = np.linalg.svd(update)[0][:, 0]  # input side of the [in, out] update
      np.testing.assert_allclose(abs(prototypes[e] @ u), 1.0, rtol=1e-5)  # equal up to sign
      np.testing.assert_allclose(np.linalg.norm(prototypes[e]), 1.0, rtol=1e-5)


def test_adapter_prototypes_are_numpys_top_singular_vectors_of_the_down_projection(tiny_config):
  _, _, stacked = _experts(tiny_config, "adapter")
  routers = tree_paths.flatten(routing.arrow_routers(CONFIGS["adapter"], stacked))
  flat = tree_paths.flatten(stacked)
  assert ("encoder", "layers_0", "attention", "prototypes") in routers
  assert len(routers) == 2 * 2 + 2 * 2  # attention and mlp of the encoder's, self_attention and mlp of the decoder's
  for path, prototypes in routers.items():
    down = flat[path[:-2] + (path[-2] + "_adapter", "down_kernel")]
    for e in range(NUM_EXPERTS):
      u = np.linalg.svd(down[e].astype(np.float64))[0][:, 0]
      np.testing.assert_allclose(abs(prototypes[e] @ u), 1.0, rtol=1e-5)


def test_top_k_weights():
  scores = np.array([[3.0, 1.0, 2.0, 5.0]], np.float32)
  valid = np.array([True, True, True, False])
  w = np.asarray(routing.top_k_weights(scores, valid, 2, 0.5))
  expected = np.exp(np.array([3.0, 2.0]) / 0.5)
  expected /= expected.sum()
  np.testing.assert_allclose(w[0], [expected[0], 0, expected[1], 0], rtol=1e-6)  # the invalid expert never wins
  np.testing.assert_array_equal(np.asarray(routing.top_k_weights(scores, valid, 1, 1.0))[0], [1, 0, 0, 0])


@pytest.mark.parametrize("kind", ["adapter", "lora", "ia3"])
def test_uniform_mixture_of_identical_experts_equals_one(tiny_config, batch, kind):
  model, backbone, stacked = _experts(tiny_config, kind)
  one = expert_stack.take(stacked, [1])
  identical = expert_stack.take(stacked, [1] * NUM_EXPERTS)
  alone = np.asarray(model.choice_log_likelihoods(merge_params(backbone, expert_stack.index(one, 0)), *batch))
  mixed = _routed(model, backbone, identical, routing.RoutingInputs(routing.uniform_weights(4, NUM_EXPERTS)), batch)
  # Not bitwise: the mixture adds 3 x (1/3) x delta (and LoRA computes x W + s (x a) b, not
  # x (W + s a b)); float32 rounding of scores ~30: worst seen 1.5e-5 absolute.
  np.testing.assert_allclose(mixed, alone, rtol=2e-6, atol=5e-5)
  assert np.abs(alone - np.asarray(model.choice_log_likelihoods(
      merge_params(backbone, expert_stack.index(stacked, 0)), *batch))).max() > 1e-2  # experts differ


def test_arrow_routes_per_token_and_top_k_one_of_identical_experts_is_that_expert(tiny_config, batch):
  model, backbone, stacked = _experts(tiny_config, "lora")
  identical = expert_stack.take(stacked, [2] * NUM_EXPERTS)
  arrow = routing.RoutingInputs(routing.uniform_weights(4, NUM_EXPERTS),
                                routing.arrow_routers(CONFIGS["lora"], identical))
  alone = np.asarray(model.choice_log_likelihoods(merge_params(backbone, expert_stack.index(stacked, 2)), *batch))
  np.testing.assert_allclose(_routed(model, backbone, identical, arrow, batch, top_k=1), alone, rtol=2e-6, atol=5e-5)
  # On distinct experts Arrow's per-token choice differs from the uniform mixture and from each expert.
  arrow = routing.RoutingInputs(routing.uniform_weights(4, NUM_EXPERTS), routing.arrow_routers(CONFIGS["lora"], stacked))
  routed = _routed(model, backbone, stacked, arrow, batch, top_k=1)
  uniform = _routed(model, backbone, stacked, routing.RoutingInputs(routing.uniform_weights(4, NUM_EXPERTS)), batch)
  assert np.abs(routed - uniform).max() > 1e-3


def test_refusals_name_the_reason(tiny_config):
  _, _, stacked = _experts(tiny_config, "ia3")
  with pytest.raises(routing.RoutingError, match=r"Arrow cannot route ia3 experts: an \(IA\)\^3 expert only rescales"):
    routing.arrow_routers(CONFIGS["ia3"], stacked)
  with pytest.raises(routing.RoutingError, match="full experts cannot be routed: a full fine-tune replaces"):
    routing.RoutedExperts.over(ExpertConfig(kind="full"))
  with pytest.raises(routing.RoutingError, match="top_k: expected a positive integer, got 0"):
    routing.RoutedExperts.over(CONFIGS["lora"], top_k=0)
  with pytest.raises(routing.RoutingError, match="temperature: expected a positive number, got 0"):
    routing.RoutedExperts.over(CONFIGS["lora"], temperature=0)
  with pytest.raises(routing.RoutingError, match="rows summing to 1"):
    routing.RoutingInputs(np.ones((2, 3), np.float32))
  with pytest.raises(routing.RoutingError, match="forced expert: expected an index below 3, got 3"):
    routing.forced_weights(2, 3, 3)
