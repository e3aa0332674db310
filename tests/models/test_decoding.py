"""Greedy and beam search with the KV cache agree with teacher-forced decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax.models import decoding
from elm_jax.models.t5 import Transformer, init_params


@pytest.fixture(scope="module")
def setup(tiny_config):
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  model = Transformer(tiny_config)
  tokens = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [11, 12, 1, 0, 0, 0, 0, 0], [3, 4, 5, 1, 0, 0, 0, 0]],
                    np.int32)
  return model, params, tokens


def _teacher_forced_logp(model, params, tokens, out):
  dec = np.concatenate([np.zeros((out.shape[0], 1), np.int32), out[:, :-1]], axis=1)
  logits = model.apply({"params": params}, tokens, dec)
  return np.asarray(jax.nn.log_softmax(logits, -1))


def test_greedy_matches_teacher_forcing(setup):
  model, params, tokens = setup
  out, total = decoding.greedy_decode(model, params, tokens, max_decode_length=10)
  out = np.asarray(out)
  logp = _teacher_forced_logp(model, params, tokens, out)
  expected_total = np.zeros(len(out))
  for b in range(out.shape[0]):
    for t in range(out.shape[1]):
      assert out[b, t] == np.argmax(logp[b, t]), (b, t)
      expected_total[b] += logp[b, t, out[b, t]]
      if out[b, t] == model.config.eos_id:
        assert (out[b, t + 1:] == 0).all()
        break
  # Two code paths of ours (cached step-by-step against teacher-forced), not exact: other shapes,
  # other summation order. Worst seen 1.3e-7 relative (totals ~-35); argmax margins >= 9e-3.
  np.testing.assert_allclose(np.asarray(total), expected_total, rtol=1e-5, atol=1e-5)


def test_greedy_stops_at_eos(setup, tiny_config):
  model, params, tokens = setup
  # Make EOS the most likely token everywhere by boosting its output column.
  boosted = jax.tree_util.tree_map(lambda x: x, params)
  kernel = np.array(boosted["decoder"]["logits_dense"]["kernel"])
  kernel[:, tiny_config.eos_id] += 50.0
  boosted["decoder"]["logits_dense"]["kernel"] = jnp.asarray(kernel)
  out, _ = decoding.greedy_decode(model, boosted, tokens, max_decode_length=6)
  np.testing.assert_array_equal(np.asarray(out)[:, 0], tiny_config.eos_id)
  np.testing.assert_array_equal(np.asarray(out)[:, 1:], 0)


def test_beam_of_one_is_greedy(setup):
  model, params, tokens = setup
  greedy, _ = decoding.greedy_decode(model, params, tokens, max_decode_length=10)
  beam, _ = decoding.beam_search(model, params, tokens, beam_size=1, max_decode_length=10)
  # Tokens: exact, as long as no top-2 logit margin (>= 9e-3 here) is within float32 noise.
  np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


def test_beam_score_is_consistent_and_no_worse_than_greedy(setup):
  model, params, tokens = setup
  length = 10
  greedy, greedy_total = decoding.greedy_decode(model, params, tokens, max_decode_length=length)
  beam, score = decoding.beam_search(model, params, tokens, beam_size=4, max_decode_length=length,
                                     length_penalty=1.0)
  beam, score = np.asarray(beam), np.asarray(score)
  logp = _teacher_forced_logp(model, params, tokens, beam)
  for b in range(beam.shape[0]):
    n = length
    eos = np.where(beam[b] == model.config.eos_id)[0]
    if len(eos):
      n = eos[0] + 1
    total = sum(logp[b, t, beam[b, t]] for t in range(n))
    # As in test_greedy_matches_teacher_forcing (worst seen 1.5e-7 relative, scores ~-3).
    np.testing.assert_allclose(score[b], total / n, rtol=1e-5, atol=1e-5)
    g = np.asarray(greedy)[b]
    g_eos = np.where(g == model.config.eos_id)[0]
    g_len = g_eos[0] + 1 if len(g_eos) else length
    assert score[b] >= np.asarray(greedy_total)[b] / g_len - 1e-5  # slack: ~20x the paths' noise
