"""Scores over the paper's vocabulary: with `T5Config.softmax_vocab_size` (the paper's resized
32,100-entry output layer) choice scores and the loss normalise over the first N logits only;
compared with a direct computation from the full logits."""

import flax.linen as nn
import jax
import numpy as np

from elm_jax.evaluation import rank_scoring
from elm_jax.models.model import EncoderDecoderModel, shift_right
from elm_jax.models.t5 import Transformer, init_params


def test_choice_scores_and_loss_over_the_first_n_logits(tiny_config):
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  cut = tiny_config.replace(softmax_vocab_size=300)  # of 320
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 300, (2, 12)).astype(np.int32)
  inputs[:, -1] = 1
  targets = rng.integers(3, 300, (2, 3, 5)).astype(np.int32)
  targets[..., -1] = 1
  got = np.asarray(rank_scoring.choice_log_likelihoods(EncoderDecoderModel.build(cut), params, inputs, targets))
  full = EncoderDecoderModel.build(tiny_config)
  flat = targets.reshape(6, 5)
  logits = np.asarray(Transformer(tiny_config).apply(
      {"params": params}, np.repeat(inputs, 3, 0), np.asarray(shift_right(flat, 0))), np.float64)[..., :300]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = np.take_along_axis(logp, flat[..., None], -1)[..., 0].sum(-1).reshape(2, 3)
  # Ours (float32) against float64 numpy: sums of 5 log-probabilities of size ~6.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  over_all = np.asarray(rank_scoring.choice_log_likelihoods(full, params, inputs, targets))
  assert np.all(got > over_all)  # fewer entries to normalise over: every choice scores higher
  batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": np.asarray(shift_right(flat[:2], 0)),
           "decoder_target_tokens": flat[:2]}
  loss_cut, _ = EncoderDecoderModel.build(cut).loss(params, batch)
  loss_full, _ = full.loss(params, batch)
  assert float(loss_cut) < float(loss_full)
