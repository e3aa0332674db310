"""The training loss's hand-written gradient (`model.token_nll`) against autodiff of the plain
formula, -log_softmax(logits)[target]: values, gradients (plain, vmapped over experts, bfloat16
logits) and the token-accuracy count."""

import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models.model import cross_entropy, token_nll


def plain_cross_entropy(logits, targets, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  tokens = jnp.sum(weights)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
  return jnp.sum(nll * weights) / jnp.maximum(tokens, 1.0), correct, tokens


def batch(seed, shape=(3, 5), vocab=97, scale=4.0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  logits = scale * jax.random.normal(k1, shape + (vocab,), jnp.float32)
  targets = jax.random.randint(k2, shape, 0, vocab)
  weights = (jax.random.uniform(k3, shape) > 0.3).astype(jnp.float32)
  return logits, targets, weights


def assert_close(actual, expected, rtol):
  """Within rtol of the largest |expected| (a gradient's entries span orders of magnitude)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(1e-30, np.abs(expected).max()))


def test_values_and_metrics_match_the_plain_formula():
  logits, targets, weights = batch(0)
  loss, correct, tokens = cross_entropy(logits, targets, weights)
  ref_loss, ref_correct, ref_tokens = plain_cross_entropy(logits, targets, weights)
  assert_close(loss, ref_loss, 1e-6)
  assert float(tokens) == float(ref_tokens)
  assert float(correct) == float(ref_correct)  # random logits: no ties
  nll, top = token_nll(logits, targets)
  assert nll.shape == top.shape == targets.shape and top.dtype == jnp.bool_


def test_gradient_matches_autodiff_of_the_plain_formula():
  logits, targets, weights = batch(1)
  grad = jax.grad(lambda x: cross_entropy(x, targets, weights)[0])(logits)
  ref = jax.grad(lambda x: plain_cross_entropy(x, targets, weights)[0])(logits)
  assert_close(grad, ref, 1e-6)
  # Through a matmul, as the output projection feeds it, and vmapped over 4 experts.
  hidden = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 5, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 97))

  def per_expert(loss_fn):
    return jax.vmap(jax.grad(lambda h, k: loss_fn(h @ k, targets, weights)[0], argnums=(0, 1)))(hidden, kernel)

  for got, want in zip(per_expert(cross_entropy), per_expert(plain_cross_entropy)):
    assert_close(got, want, 1e-5)


def test_bfloat16_logits_get_a_bfloat16_gradient_of_the_same_value():
  logits, targets, weights = batch(4)
  low = logits.astype(jnp.bfloat16)
  grad = jax.grad(lambda x: cross_entropy(x, targets, weights)[0])(low)
  ref = jax.grad(lambda x: plain_cross_entropy(x, targets, weights)[0])(low)
  assert grad.dtype == jnp.bfloat16
  assert_close(grad, ref, 1e-2)  # both rounded once to bfloat16 (8 bits of mantissa)


def test_a_tie_for_the_largest_logit_counts_as_correct():
  logits = jnp.zeros((1, 2, 5))  # every logit ties
  targets = jnp.array([[0, 3]])
  _, correct, _ = cross_entropy(logits, targets, jnp.ones((1, 2)))
  assert float(correct) == 2.0  # argmax would count only target 0
