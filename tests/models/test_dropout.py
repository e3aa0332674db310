"""Dropout as the paper's Hugging Face T5 draws it (every element), or T5X's form (one draw per
feature along the sequence) when the config asks; the cheaper mask keeps the rate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax.models import layers
from elm_jax.models.t5 import Transformer, init_params
from elm_jax.models.t5_config import ConfigError


def test_keep_mask_drops_at_the_rate():
  """4M draws: the drop share is the rate to within 5 standard deviations (0.00075 at 0.1),
  and the two 16-bit halves of a word are not the same draw."""
  mask = np.asarray(layers.dropout_keep_mask(jax.random.PRNGKey(0), 0.1, (2000, 2001)))
  assert abs((1 - mask.mean()) - 0.1) < 5 * np.sqrt(0.1 * 0.9 / mask.size)
  pairs = mask.reshape(-1)[:2 * (mask.size // 2)].reshape(-1, 2)
  assert abs(np.mean(pairs[:, 0] & pairs[:, 1]) - 0.81) < 0.002  # independent halves: 0.9 x 0.9
  # Another key, another mask; the same key, the same mask.
  assert not np.array_equal(mask, np.asarray(layers.dropout_keep_mask(jax.random.PRNGKey(1), 0.1, (2000, 2001))))
  assert np.array_equal(mask, np.asarray(layers.dropout_keep_mask(jax.random.PRNGKey(0), 0.1, (2000, 2001))))


def test_dropout_scales_what_it_keeps_and_broadcasts_where_asked():
  x = jnp.arange(1, 4 * 50 * 8 + 1, dtype=jnp.float32).reshape(4, 50, 8)
  y = np.asarray(layers.dropout(x, 0.25, jax.random.PRNGKey(2)))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0 < kept.mean() < 1
  shared = np.asarray(layers.dropout(x, 0.25, jax.random.PRNGKey(2), broadcast_dims=(-2,))) != 0
  assert (shared == shared[:, :1, :]).all() and 0 < shared.mean() < 1


def _embedding_dropout_zeros(config):
  """Which entries the encoder's embedding dropout zeroed: [batch, length, embed] bool."""
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0)))
  tokens = jnp.full((2, 40), 7, jnp.int32)
  _, state = Transformer(config).apply({"params": params}, tokens, method=Transformer.encode,
                                       deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)},
                                       capture_intermediates=True)
  dropped = state["intermediates"]["encoder"]["Dropout_0"]["__call__"][0]
  return np.asarray(dropped) == 0


@pytest.mark.parametrize("broadcast", [False, True])
def test_the_config_chooses_the_form(tiny_config, broadcast):
  """The paper's form by default: a feature is dropped at some positions and kept at others.
  T5X's form: a feature is dropped at every position of a row or at none."""
  zeros = _embedding_dropout_zeros(tiny_config.replace(dropout_rate=0.5, dropout_broadcast_over_length=broadcast))
  per_feature = zeros.mean(axis=1)  # [batch, embed]: the share of positions dropped
  if broadcast:
    assert set(np.unique(per_feature)) == {0.0, 1.0}
  else:
    assert ((per_feature > 0) & (per_feature < 1)).mean() > 0.9


def test_a_bad_form_is_refused(tiny_config):
  with pytest.raises(ConfigError, match="dropout_broadcast_over_length: expected true or false"):
    tiny_config.replace(dropout_broadcast_over_length="yes")


def test_a_sharded_mask_is_drawn_where_its_activations_live():
  """Activations [64, 256] split by rows over the devices: each device draws the words of its
  own rows ([64 / devices, 128] 32-bit words), not the whole mask."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  devices = jax.devices()
  sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data", None))
  drop = jax.jit(lambda key, x: layers.dropout(x, 0.1, key), in_shardings=(None, sharding), out_shardings=sharding)
  x = jax.device_put(jnp.ones((64, 256)), sharding)
  program = drop.lower(jax.random.PRNGKey(0), x).compile().as_text()
  assert f"u32[{64 // len(devices)},128]" in program
  if len(devices) > 1:
    assert "u32[64,128]" not in program
  kept = np.asarray(drop(jax.random.PRNGKey(0), x)) != 0
  assert abs(kept.mean() - 0.9) < 0.02
