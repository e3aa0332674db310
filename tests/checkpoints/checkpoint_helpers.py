"""Tiny configs and random parameter trees shared by the checkpoint tests."""

import numpy as np

from elm_jax.models.t5_config import T5Config, param_shapes

GATED = T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                 num_encoder_layers=2, num_decoder_layers=2)
TIED = GATED.replace(mlp_activations=("relu",), logits_via_embedding=True)


def random_params(config, seed=0):
  """A float32 tree in our layout with the shapes `config` implies."""
  rng = np.random.default_rng(seed)

  def fill(node):
    if isinstance(node, dict):
      return {k: fill(v) for k, v in node.items()}
    return rng.standard_normal(node).astype(np.float32)

  return fill(param_shapes(config))


def assert_trees_equal(a, b):
  assert isinstance(a, dict) == isinstance(b, dict)
  if isinstance(a, dict):
    assert sorted(a) == sorted(b)
    for k in a:
      assert_trees_equal(a[k], b[k])
  else:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
