"""The rank-classification path that does the least work computes what the plain one does:
`EncoderDecoderModel.choice_log_likelihoods` (each input encoded once, cross-attention keys and
values projected once per input and shared by its choices, the log-softmax taken over vocabulary
pieces) against the paper's way (every (input, choice) pair its own row through the whole
Transformer, full logits, `jax.nn.log_softmax`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax import batching
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel, projected_token_log_likelihoods, shift_right
from elm_jax.models.t5 import Transformer, init_params


def _paper_way(model, params, inputs, targets):
  """[N, Li], [N, C, Lt] -> [N, C]: inputs repeated for every choice, full logits."""
  n, c, lt = targets.shape
  rows = jnp.repeat(inputs, c, axis=0)
  flat = targets.reshape(n * c, lt)
  logits = model.module.apply({"params": params}, rows, shift_right(flat, model.config.decoder_start_id))
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0] * (flat != 0)
  return picked.sum(-1).reshape(n, c)


def _batch(vocab, rng, n=5, c=3, li=11, lt=6):
  inputs = rng.integers(3, vocab, (n, li))
  inputs[:, -rng.integers(0, 4):] = 0  # some padding
  inputs[:, 0] = 5
  targets = rng.integers(3, vocab, (n, c, lt))
  for i in range(n):
    for j in range(c):
      targets[i, j, rng.integers(1, lt + 1):] = 0  # ragged choices, at least one token
  return jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)


@pytest.mark.parametrize("variant", ["adapter", "lora", "tied_original", "softmax_vocab"])
def test_choice_scores_equal_the_paper_way(tiny_config, variant):
  config, expert = tiny_config, ExpertConfig(reduction_factor=4)
  if variant == "lora":
    expert = ExpertConfig(kind="lora", lora_targets=("query", "key", "value", "out"))
  if variant == "tied_original":  # original T5: tied embeddings, logits scaled by emb^-0.5
    config = config.replace(logits_via_embedding=True, mlp_activations=("relu",))
  if variant == "softmax_vocab":
    config = config.replace(softmax_vocab_size=300)
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert))
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(np.float32), params)
  model = EncoderDecoderModel.build(config, expert)
  inputs, targets = _batch(config.softmax_vocab_size or config.vocab_size, rng)  # ids the softmax holds
  got = jax.jit(model.choice_log_likelihoods)(params, inputs, targets)
  want = jax.jit(lambda p, i, t: _paper_way(model, p, i, t))(params, inputs, targets)
  # Two computations of the same float32 sums in another order (keys and values once per input,
  # the log-sum-exp in pieces): agreement to float32 rounding relative to |score| (up to ~40).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
  assert np.abs(np.diff(np.asarray(want), axis=1)).max() > 0.1  # the choices' scores differ


def test_log_softmax_in_pieces_equals_the_whole(tiny_config):
  """Pieces of 64 columns over 300 (the last piece padded): the same log-probabilities."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(0, 1, (4, 7, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(0, 1, (32, 300)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 300, (4, 7)), jnp.int32)
  whole = jax.nn.log_softmax(hidden @ kernel, axis=-1)
  want = jnp.take_along_axis(whole, targets[..., None], axis=-1)[..., 0]
  for chunk in (64, 300, 8192):
    got = projected_token_log_likelihoods(hidden, kernel, targets, chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_shared_key_value_rows_equal_repeated_rows(tiny_config):
  """Cross-attention with an input's encoder output shared by its 3 choice rows equals the
  same attention with the encoder output repeated for each row."""
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(1)))
  rng = np.random.default_rng(1)
  inputs, targets = _batch(tiny_config.vocab_size, rng)
  module = Transformer(tiny_config)
  mask = inputs != 0
  encoded = module.apply({"params": params}, inputs, mask, method=Transformer.encode)
  flat = targets.reshape(-1, targets.shape[-1])
  decoder_in = shift_right(flat, 0)
  shared = module.apply({"params": params}, encoded, mask, decoder_in, method=Transformer.decode)
  repeated = module.apply({"params": params}, jnp.repeat(encoded, 3, 0), jnp.repeat(mask, 3, 0), decoder_in,
                          method=Transformer.decode)
  np.testing.assert_allclose(shared, repeated, rtol=1e-5, atol=1e-5 * float(np.abs(repeated).max()))


def test_cost_ladder_pads_by_at_most_an_eighth():
  sizes = [batching.cost_bucket(n) for n in range(1, 2049)]
  assert sizes[:16] == list(range(1, 17)) and batching.cost_bucket(17) == 18 and batching.cost_bucket(65) == 72
  assert all(n <= s <= n * 1.125 for n, s in zip(range(1, 2049), sizes))
  assert sizes == sorted(sizes) and len(set(sizes)) == 16 + 7 * 8  # 16 lengths, then 8 per doubling
  assert batching.cost_bucket(3, minimum=16) == 16 and batching.cost_bucket(500, maximum=128) == 128


def _pack_pairs(inputs: np.ndarray, targets: np.ndarray):
  """Rows i and N-1-i of unpacked [N, Li] inputs into one row each: (tokens [N/2, 2 Li],
  segments [N/2, 2 Li], targets reordered [N, C, Lt] so that row 2r + s reads segment s + 1)."""
  n = len(inputs)
  tokens = np.zeros((n // 2, 2 * inputs.shape[1]), np.int32)
  segments = np.zeros_like(tokens)
  order = []
  for r in range(n // 2):
    at = 0
    for s, i in enumerate((r, n - 1 - r)):
      ids = inputs[i][inputs[i] != 0]
      tokens[r, at:at + len(ids)] = ids
      segments[r, at:at + len(ids)] = s + 1
      at += len(ids)
      order.append(i)
  return jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(targets[np.asarray(order)]), order


@pytest.mark.parametrize("variant", ["adapter", "lora", "tied_original"])
def test_packed_inputs_score_as_unpacked(tiny_config, variant):
  """Two inputs packed in one encoder row (segment ids keep each to itself, in self-attention
  and in its choices' cross-attention) score as each alone in its own padded row."""
  config, expert = tiny_config, ExpertConfig(reduction_factor=4)
  if variant == "lora":
    expert = ExpertConfig(kind="lora", lora_targets=("query", "key", "value", "out"))
  if variant == "tied_original":
    config = config.replace(logits_via_embedding=True, mlp_activations=("relu",))
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert))
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(np.float32), params)
  model = EncoderDecoderModel.build(config, expert)
  inputs, targets = _batch(config.vocab_size, rng, n=6, li=13)
  inputs = np.array(inputs)
  for i, length in enumerate((2, 13, 5, 9, 7, 1)):  # ragged: some pairs fill the row, some do not
    inputs[i, length:] = 0
  want = jax.jit(model.choice_log_likelihoods)(params, jnp.asarray(inputs), targets)
  tokens, segments, packed_targets, order = _pack_pairs(inputs, np.asarray(targets))
  got = jax.jit(model.choice_log_likelihoods)(params, tokens, packed_targets, segments)
  np.testing.assert_allclose(got, np.asarray(want)[order], rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
  # The segments matter: without them each input would attend to its row-mate.
  mixed = jax.jit(model.choice_log_likelihoods)(params, tokens, packed_targets, jnp.minimum(segments, 1))
  assert np.abs(np.asarray(mixed) - np.asarray(want)[order]).max() > 1e-3


def test_scoring_only_the_real_tokens_equals_all(tiny_config):
  """The output projection on the choices' real tokens only (`scored_positions`, in any order,
  padded past the end) gives the scores of projecting every position."""
  config, expert = tiny_config, ExpertConfig(reduction_factor=4)
  params = nn.unbox(init_params(config, jax.random.PRNGKey(2), expert=expert))
  model = EncoderDecoderModel.build(config, expert)
  inputs, targets = _batch(config.vocab_size, np.random.default_rng(8))
  want = jax.jit(model.choice_log_likelihoods)(params, inputs, targets)
  real = np.flatnonzero(np.asarray(targets).reshape(-1) != 0)
  scored = np.concatenate([np.random.default_rng(0).permutation(real), np.full(5, targets.size)]).astype(np.int32)
  got = jax.jit(model.choice_log_likelihoods)(params, inputs, targets, None, jnp.asarray(scored))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
  # Leaving a real token out changes its choice's score: the positions are what is summed.
  short = jax.jit(model.choice_log_likelihoods)(params, inputs, targets, None, jnp.asarray(scored[1:]))
  assert np.sum(np.abs(np.asarray(short) - np.asarray(want)) > 1e-3) == 1
