"""The sharded forward pass equals the single-device one, and parameters are split as the rules say."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from elm_jax import partitioning
from elm_jax.models.t5 import Transformer, init_params, logical_axes


@pytest.fixture(scope="module")
def setup(tiny_config):
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  enc = rng.integers(2, tiny_config.vocab_size, (8, 24)).astype(np.int32)
  enc[:, 20:] = 0
  dec = rng.integers(2, tiny_config.vocab_size, (8, 8)).astype(np.int32)
  return Transformer(tiny_config), params, enc, dec


def test_eight_devices_present():
  assert jax.device_count() == 8


@pytest.mark.parametrize("mesh", [(2, 1, 4), (8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(setup, tiny_config, mesh):
  model, params, enc, dec = setup
  reference = np.asarray(model.apply({"params": params}, enc, dec))
  part = partitioning.Partitioner(partitioning.MeshConfig(*mesh))
  axes = logical_axes(tiny_config)
  placed = part.place(params, axes)
  forward = part.partition(lambda p, e, d: model.apply({"params": p}, e, d),
                           (axes, P("batch", "length"), P("batch", "length")),
                           P("batch", "length", "vocab"))
  out = forward(placed, enc, dec)
  # Two code paths of ours, not exact: each partition runs smaller matmuls (and a 'model' split
  # an all-reduce), so float32 sums in another order. A logit's rounding follows the size of the
  # terms summed (the largest logits, 3.8), not its own value: worst seen 3.6e-6, ~1e-6 of
  # max |logit| (8 eps32); the floor 1e-5 x max |logit| leaves ~10x. A wrong split gives O(1).
  np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5,
                             atol=1e-5 * np.abs(reference).max())
  data, _, model_axis = mesh
  assert out.sharding.spec == P("data", None, "model")
  shard = out.addressable_shards[0].data
  assert shard.shape == (8 // data, 8, tiny_config.vocab_size // model_axis)


def test_parameters_are_split_by_the_rules(setup, tiny_config):
  _, params, _, _ = setup
  part = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=1, model=4))
  placed = part.place(params, logical_axes(tiny_config))
  wi = placed["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]           # ('embed', 'mlp')
  assert wi.sharding.spec == P(None, "model")
  assert wi.addressable_shards[0].data.shape == (32, 64 // 4)
  query = placed["decoder"]["layers_1"]["self_attention"]["query"]["kernel"]  # ('embed', 'joined_kv')
  assert query.addressable_shards[0].data.shape == (32, 32 // 4)
  embedding = placed["token_embedder"]["embedding"]                      # ('vocab', 'embed')
  assert embedding.addressable_shards[0].data.shape == (320 // 4, 32)
  norm = placed["encoder"]["encoder_norm"]["scale"]                      # ('embed',) replicated
  assert norm.addressable_shards[0].data.shape == (32,)
  relpos = placed["encoder"]["relpos_bias"]["rel_embedding"]             # ('heads', 'relpos_buckets')
  assert relpos.addressable_shards[0].data.shape == (1, 32)


def test_mesh_config_errors():
  with pytest.raises(partitioning.PartitioningError, match="not divisible"):
    partitioning.MeshConfig(data=-1, model=3).resolve(8)
  with pytest.raises(partitioning.PartitioningError, match="needs 12 devices"):
    partitioning.MeshConfig(data=2, expert=2, model=3).resolve(8)
  with pytest.raises(partitioning.PartitioningError, match="unknown mesh axis"):
    partitioning.Partitioner(logical_axis_rules=(("batch", "pipeline"),))


def test_indivisible_parameter_is_a_clear_error(setup, tiny_config):
  _, params, _, _ = setup
  part = partitioning.Partitioner(partitioning.MeshConfig(data=1, expert=1, model=8))
  with pytest.raises(partitioning.PartitioningError, match="rel_embedding"):
    part.place(params, logical_axes(tiny_config))
