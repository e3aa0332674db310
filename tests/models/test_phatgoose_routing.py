"""PHATGOOSE's weights in the routed model (models/routing.py): standardised scores, top-k and
softmax at inference; sigmoid(<x, g>) per expert, unnormalised, in gate training."""

from typing import Any

import flax.linen as nn
import numpy as np

from elm_jax.models import routing
from elm_jax.models.experts import ExpertConfig


class _Probe(nn.Module):
  """Calls the routed experts' weights at the site ('site',) from inside a module."""
  routed: Any

  @nn.compact
  def __call__(self, x):
    return self.routed._weights(self, ("site",), x)


def _weights(gates, x, **kw):
  routed = routing.RoutedExperts.over([ExpertConfig(kind="adapter")], **kw)
  variables = {"routing": {"site": {"gates": gates}, "valid": np.ones(len(gates), bool),
                           "example_weights": np.full((x.shape[0], len(gates)), 1 / len(gates), np.float32)}}
  return np.asarray(_Probe(routed).apply(variables, x))


def _standardise(v):
  c = v - v.mean(-1, keepdims=True)
  return c / np.sqrt((c * c).mean(-1, keepdims=True))


def test_standardise():
  rng = np.random.default_rng(0)
  v = rng.normal(3.0, 2.0, (4, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(routing.standardise(v)), _standardise(v), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(routing.standardise(np.full((2, 8), 5.0))), 0.0)  # constant: 0


def test_inference_weights_are_top_k_softmax_of_standardised_scores():
  rng = np.random.default_rng(1)
  x, gates = rng.normal(size=(2, 5, 16)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
  w = _weights(gates, x, top_k=2, temperature=3.0)
  scores = np.einsum("rli,ei->rle", _standardise(x), _standardise(gates))
  top = np.argsort(-scores, -1)[..., :2]
  expected = np.zeros_like(scores)
  kept = np.take_along_axis(scores, top, -1) / 3.0
  shares = np.exp(kept - kept.max(-1, keepdims=True))
  np.put_along_axis(expected, top, shares / shares.sum(-1, keepdims=True), -1)
  np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-6)
  assert (w > 0).sum(-1).max() == 2


def test_gate_training_weights_are_each_experts_sigmoid_gate():
  rng = np.random.default_rng(2)
  x, gates = rng.normal(size=(2, 5, 16)).astype(np.float32), rng.normal(size=(1, 16)).astype(np.float32)
  w = _weights(gates, x, gate_training=True)
  np.testing.assert_allclose(w, 1 / (1 + np.exp(-np.einsum("rli,ei->rle", x, gates))), rtol=1e-5)
