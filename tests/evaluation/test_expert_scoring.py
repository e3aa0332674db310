"""score_all_experts: one vmapped pass over stacked experts equals scoring each expert alone."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import batching, expert_stack, partitioning
from elm_jax.evaluation import expert_decoding, rank_scoring
from elm_jax.models import decoding
from elm_jax.models.adapters import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.training.trainer import initial_experts

NUM_EXPERTS = 5


def _examples(vocab_size, rng):
  """7 examples with 2-4 choices of different lengths (ragged on purpose)."""
  examples = []
  for n in range(7):
    inputs = rng.integers(3, vocab_size, rng.integers(3, 30)).tolist()
    choices = [rng.integers(3, vocab_size, rng.integers(1, 9)).tolist() for _ in range(2 + n % 3)]
    examples.append(rank_scoring.Example(inputs, choices))
  return examples


def _experts(tiny_config, kind):
  expert_config = ExpertConfig(kind=kind, reduction_factor=4, lora_targets=("query", "value", "wo"))
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  backbone, stacked = initial_experts(tiny_config, expert_config, pretrained, NUM_EXPERTS, seed=1,
                                     shared_init=False)  # distinct experts
  rng = np.random.default_rng(7)  # make the experts differ a lot (LoRA's B starts at zero)
  stacked = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.2, x.shape).astype(np.float32), stacked)
  return EncoderDecoderModel.build(tiny_config, expert_config), backbone, stacked


@pytest.fixture(scope="module", params=["adapter", "lora"])
def setup(request, tiny_config):
  model, backbone, stacked = _experts(tiny_config, request.param)
  examples = _examples(tiny_config.vocab_size, np.random.default_rng(0))
  loop = []
  for e in range(NUM_EXPERTS):
    scorer = rank_scoring.RankScorer(model, merge_params(backbone, expert_stack.index(stacked, e)), batch_size=4)
    loop.append(scorer.score(examples)[0])
  return model, backbone, stacked, examples, loop


def _as_padded(loop, num_choices):
  out = np.full((len(loop), len(loop[0]), num_choices), -np.inf, np.float32)
  for e, per_example in enumerate(loop):
    for n, s in enumerate(per_example):
      out[e, n, :len(s)] = s
  return out


@pytest.mark.parametrize("expert_chunk", [None, 3])
def test_one_pass_equals_a_loop_over_experts(setup, expert_chunk):
  model, backbone, stacked, examples, loop = setup
  scores, counts, scorer = rank_scoring.score_all_experts(model, backbone, stacked, examples,
                                                          batch_size=4, expert_chunk=expert_chunk)
  expected = _as_padded(loop, 4)
  assert scores.shape == (NUM_EXPERTS, 7, 4)
  finite = np.isfinite(expected)
  assert np.array_equal(np.isfinite(scores), finite)  # padded choices are -inf, real ones finite
  # Two code paths of ours (experts vmapped against one at a time): bitwise equal here, but not by
  # construction (vmap batches the matmuls, XLA may block them differently), so relative to
  # |score| (up to ~57) as in test_many_choices_are_split_over_rows.
  np.testing.assert_allclose(scores[finite], expected[finite], rtol=1e-5, atol=1e-5)
  # Experts really differ, so the comparison would catch an expert mix-up.
  assert np.abs(scores[0][finite[0]] - scores[1][finite[1]]).max() > 0.1
  assert counts.tolist()[0][:2] == [len(c) + 1 for c in examples[0].choices]
  assert (counts == 0).sum() == (~finite[0]).sum()
  # One program for every chunk (the last one padded); CPU's default chunk when none is given.
  assert {shape[0] for shape in scorer.shapes_compiled} == {expert_chunk or rank_scoring.CPU_EXPERT_CHUNK}


def test_sharded_over_the_expert_axis_equals_a_loop(setup):
  model, backbone, stacked, examples, loop = setup
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=2, model=2))
  scores, _, scorer = rank_scoring.score_all_experts(model, backbone, stacked, examples, batch_size=4,
                                                     expert_chunk=3, partitioner=partitioner)
  assert scorer.expert_chunk == 4  # rounded up to a multiple of the expert axis
  expected = _as_padded(loop, 4)
  finite = np.isfinite(expected)
  # Not exact (partitioned matmuls sum in another order): worst seen 7.4e-7 relative.
  np.testing.assert_allclose(scores[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_single_model_scores_keep_their_shape(setup, tiny_config):
  model, backbone, stacked, examples, loop = setup
  scorer = rank_scoring.RankScorer(model, merge_params(backbone, expert_stack.index(stacked, 3)), batch_size=4)
  scores, _ = scorer.score(examples)
  assert [s.shape for s in scores] == [(len(ex.choices),) for ex in examples]
  for s, expected in zip(scores, loop[3]):
    np.testing.assert_array_equal(s, expected)  # exact: the very computation that made loop[3]


def test_one_pass_decoding_equals_each_expert_alone(setup, tiny_config):
  model, backbone, stacked, examples, _ = setup
  tokens = np.zeros((4, 32), np.int32)
  for r, ex in enumerate(examples[:4]):
    tokens[r, :len(ex.inputs) + 1] = ex.inputs + [tiny_config.eos_id]
  for beam_size in (1, 2):
    together, scores = expert_decoding.decode_all_experts(model, backbone, stacked, tokens,
                                                          max_decode_length=6, beam_size=beam_size)
    for e in range(NUM_EXPERTS):
      params = merge_params(backbone, expert_stack.index(stacked, e))
      if beam_size == 1:
        alone, alone_scores = decoding.greedy_decode(model.module, params, tokens, max_decode_length=6)
      else:
        alone, alone_scores = decoding.beam_search(model.module, params, tokens, beam_size=2,
                                                   max_decode_length=6)
      # Tokens: exact unless a top-2 margin falls within float32 noise; scores: not exact (vmapped
      # matmuls), worst seen 1.6e-7 relative.
      np.testing.assert_array_equal(np.asarray(together[e]), np.asarray(alone))
      np.testing.assert_allclose(np.asarray(scores[e]), np.asarray(alone_scores), rtol=1e-5, atol=1e-5)
  assert len({tuple(np.asarray(together[e]).ravel()) for e in range(NUM_EXPERTS)}) > 1


def test_many_choices_are_split_over_rows(tiny_config):
  """An example with more than MAX_CHOICES_PER_ROW choices is scored in several rows (memory
  stays that of a 16-choice batch): its scores equal those of each choice scored on its own.
  Two code paths of ours with different batch shapes: XLA may block the matmuls differently,
  so equal to float32 rounding (rtol 1e-5), not bitwise."""
  model = EncoderDecoderModel.build(tiny_config)
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(3)))
  rng = np.random.default_rng(5)
  inputs = rng.integers(3, tiny_config.vocab_size, 20).tolist()
  choices = [rng.integers(3, tiny_config.vocab_size, rng.integers(1, 5)).tolist() for _ in range(40)]
  scorer = rank_scoring.RankScorer(model, params, batch_size=2)
  scores, counts = scorer.score([rank_scoring.Example(inputs, choices)])
  assert scores[0].shape == (40,) and counts[0].tolist() == [len(c) + 1 for c in choices]
  assert max(shape[3] for shape in scorer.shapes_compiled) == rank_scoring.MAX_CHOICES_PER_ROW
  alone = [rank_scoring.RankScorer(model, params, batch_size=2).score([rank_scoring.Example(inputs, [c])])[0][0][0]
           for c in choices]
  np.testing.assert_allclose(scores[0], alone, rtol=1e-5, atol=1e-5)


def test_packed_inputs_score_as_unpacked(setup):
  """Inputs of very different lengths packed two to an encoder row (`pack_pairs`) score as
  when every input has its own row: all experts, every example, in the original order. (This
  tiny model pads to powers of two, `length_rungs`: short and long inputs pair within 32.)"""
  model, backbone, stacked, _, _ = setup
  assert rank_scoring.length_rungs(model.config) == 1
  rng = np.random.default_rng(11)
  examples = [rank_scoring.Example(rng.integers(3, 300, length).tolist(),
                                   [rng.integers(3, 300, rng.integers(1, 6)).tolist() for _ in range(3)])
              for length in (1, 26, 3, 25, 2, 23, 4, 19, 9, 29)]  # 10: the last batch is short
  packed, counts, scorer = rank_scoring.score_all_experts(model, backbone, stacked, examples, batch_size=8)
  plain, plain_counts, plain_scorer = rank_scoring.score_all_experts(model, backbone, stacked, examples,
                                                                     batch_size=8, pack=False)
  assert {rows for _, rows, *_ in scorer.shapes_compiled} == {4}  # both batches packed, 4 rows of 2
  assert {rows for _, rows, *_ in plain_scorer.shapes_compiled} == {8}
  assert np.array_equal(counts, plain_counts)
  # Two code paths of ours (other shapes, masks instead of padding): float32 rounding, relative
  # to |score| (up to ~30 here).
  np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-5 * float(np.abs(plain).max()))
  assert np.abs(np.diff(plain, axis=1)).max() > 0.1  # examples differ: a mix-up would show


def test_inputs_of_like_length_are_not_packed():
  """Packing two like inputs saves nothing: each keeps its row."""
  assert rank_scoring.pack_pairs([30, 31, 32, 33], 4, 16, 64) is None
  length, pairs = rank_scoring.pack_pairs([2, 40, 9, 31], 4, 16, 64)
  assert length == batching.cost_bucket(2 + 40) and pairs == [(0, 1), (2, 3)]
  length, pairs = rank_scoring.pack_pairs([20, 60, 5], 4, 16, 64)  # an empty slot pairs with the longest
  assert pairs == [(None, 1), (2, 0)] and length == batching.cost_bucket(60)
  # On the powers-of-two ladder of small models: 2 rows of 64 are no fewer positions than 4 of 32.
  assert rank_scoring.pack_pairs([2, 30, 9, 31], 4, 16, 64, rungs=1) is None
  assert rank_scoring.pack_pairs([2, 20, 9, 25], 4, 16, 64, rungs=1)[0] == 32


def test_large_models_pad_finely_small_ones_to_powers_of_two(tiny_config):
  assert rank_scoring.length_rungs(tiny_config) == 1
  assert rank_scoring.length_rungs(tiny_config.replace(vocab_size=32128, emb_dim=512, num_heads=8, mlp_dim=1024,
                                                       num_encoder_layers=6, num_decoder_layers=6)) == 8
  assert [batching.cost_bucket(n, rungs=1) for n in (1, 3, 5, 17, 65)] == [1, 4, 8, 32, 128]
