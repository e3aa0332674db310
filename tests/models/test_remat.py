"""Rematerialization (`T5Config.remat_policy`): the same parameters, the same numbers, less kept
for the backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax import planning
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import ConfigError


@pytest.fixture(scope="module")
def setup(tiny_config):
  config = tiny_config.replace(dropout_rate=0.1)
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=ExpertConfig()))
  rng = np.random.default_rng(0)
  targets = rng.integers(2, config.vocab_size, (3, 5))
  batch = {"encoder_input_tokens": jnp.asarray(rng.integers(2, config.vocab_size, (3, 7))),
           "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((3, 1), int), targets[:, :-1]], 1)),
           "decoder_target_tokens": jnp.asarray(targets)}
  return config, params, batch


def _loss_and_grads(config, params, batch):
  model = EncoderDecoderModel.build(config, ExpertConfig())
  fn = jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch, jax.random.PRNGKey(3))[0]))
  return fn(params)


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_gives_the_same_loss_and_gradients_with_dropout(setup, policy):
  config, params, batch = setup
  loss, grads = _loss_and_grads(config, params, batch)
  remat_loss, remat_grads = _loss_and_grads(config.replace(remat_policy=policy), params, batch)
  # Same dropout masks (the rng is lifted into each block) and the same arithmetic, recomputed:
  # agreement to float32 rounding of the loss's scale.
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(remat_grads), jax.tree_util.tree_leaves(grads)):
    scale = float(np.max(np.abs(b))) or 1.0
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)


def test_remat_keeps_the_parameter_tree_and_decoding(setup):
  config, params, _ = setup
  remat = config.replace(remat_policy="full")
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(remat, jax.random.PRNGKey(0), expert=ExpertConfig())))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  tokens = jnp.asarray([[5, 6, 7, 1]])
  plain = EncoderDecoderModel.build(config, ExpertConfig()).predict(params, tokens, max_decode_length=4)
  rematted = EncoderDecoderModel.build(remat, ExpertConfig()).predict(params, tokens, max_decode_length=4)
  np.testing.assert_array_equal(plain[0], rematted[0])


def test_remat_keeps_less_for_the_backward_pass(setup):
  """The activations the gradient keeps from the forward pass fall with each stronger policy.
  Counted on the traced program (what every backend must keep), not in XLA:CPU's compiled
  temporaries: XLA:CPU schedules an unrolled rematerialized network without regard to memory,
  so its temporaries do not fall (TPU and GPU schedulers do)."""
  config, params, _ = setup
  rng = np.random.default_rng(1)  # activations, not parameters, must dominate: 16 x 64 tokens
  targets = rng.integers(2, config.vocab_size, (16, 64))
  batch = {"encoder_input_tokens": jnp.asarray(rng.integers(2, config.vocab_size, (16, 64))),
           "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((16, 1), int), targets[:, :-1]], 1)),
           "decoder_target_tokens": jnp.asarray(targets)}
  kept = {}
  for policy in ("none", "minimal", "full"):
    model = EncoderDecoderModel.build(config.replace(remat_policy=policy), ExpertConfig())
    kept[policy] = planning.saved_activation_bytes(
        lambda p, b: model.loss(p, b, jax.random.PRNGKey(3))[0], params, batch)
  # Without remat every block's activations are kept; 'minimal' keeps matmul outputs only,
  # 'full' only each block's input.
  assert kept["full"] < kept["minimal"] < kept["none"], kept
  assert kept["none"] > 3 * kept["full"], kept


def test_unknown_policy_is_refused(tiny_config):
  with pytest.raises(ConfigError, match="remat_policy"):
    tiny_config.replace(remat_policy="everything")
