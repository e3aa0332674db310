"""Parity with the Hugging Face reference (transformers 4.x, PyTorch) on tiny random T5 models.

Golden files in tests/golden/<variant>/ were made by tools/make_t5_goldens.py: an HF checkpoint
(config.json, model.safetensors, spiece.model) and reference.npz with the reference encoder
outputs, decoder logits and greedy decodes for the same inputs. Here the checkpoint goes through
our loader into our Flax T5 and we compare, in float32, encoder outputs (valid positions) and
decoder logits (valid target positions, magnitudes up to ~45) within
1e-5 |reference| + 3e-5 max |reference| (see MAX_RELATIVE), and greedy decodes token for token.
No torch is needed.
"""

import numpy as np
import pytest

from tests.helpers.golden import GOLDEN_DIR, GOLDEN_VARIANTS
from elm_jax.checkpoints.hf import load_hf_checkpoint
from elm_jax.models import decoding
from elm_jax.models.t5 import Transformer

# Float32 rounding depends on the order in which the CPU kernels sum (PyTorch's against XLA's,
# AVX2 against AVX-512): a value's error is ~eps32 (1.2e-7) x sqrt(n) x the typical |term| of the
# n-term dot products behind it, and those terms follow the tensor's largest values, not the
# value itself (a value near 0 is a sum of cancelling terms). So the floor is relative to the
# tensor's max |reference|: worst seen 3.7e-6 of it (Intel Xeon; t5_v1_1 logits: 1.5e-4 of
# max 40.4).
# 3e-5 leaves a ~8x margin; a wrong mask, a missing rescaling or a transposed weight moves values
# by O(1), i.e. > 1e-2 of the max.
MAX_RELATIVE = 3e-5


@pytest.fixture(scope="module", params=GOLDEN_VARIANTS)
def golden(request):
  directory = GOLDEN_DIR / request.param
  checkpoint = load_hf_checkpoint(str(directory))
  reference = dict(np.load(directory / "reference.npz"))
  return request.param, checkpoint, reference


def test_variant_config(golden):
  name, checkpoint, _ = golden
  config = checkpoint.config
  if name == "t5_original":
    assert config.mlp_activations == ("relu",) and config.logits_via_embedding
  else:
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding


def test_encoder_outputs(golden):
  _, checkpoint, ref = golden
  model = Transformer(checkpoint.config)
  encoded = model.apply({"params": checkpoint.params}, ref["input_ids"],
                        ref["attention_mask"].astype(bool), method=Transformer.encode)
  valid = ref["attention_mask"].astype(bool)
  diff = np.abs(np.asarray(encoded) - ref["encoder_outputs"])[valid]
  # Reference: PyTorch. The final RMS norm puts values at rms ~1, max ~3.8.
  assert diff.max() <= MAX_RELATIVE * np.abs(ref["encoder_outputs"][valid]).max(), diff.max()


def test_decoder_logits(golden):
  _, checkpoint, ref = golden
  model = Transformer(checkpoint.config)
  logits = model.apply({"params": checkpoint.params}, ref["input_ids"], ref["decoder_input_ids"],
                       ref["attention_mask"].astype(bool))
  valid = ref["decoder_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref["logits"][valid], rtol=1e-5,
                             atol=MAX_RELATIVE * np.abs(ref["logits"][valid]).max())


def test_greedy_decodes(golden):
  _, checkpoint, ref = golden
  model = Transformer(checkpoint.config)
  tokens, _ = decoding.greedy_decode(model, checkpoint.params, ref["input_ids"],
                                     max_decode_length=ref["greedy"].shape[1])
  np.testing.assert_array_equal(np.asarray(tokens), ref["greedy"])


def test_long_input_exercises_far_relative_positions(golden):
  """The goldens include an input beyond max_distance, so the log-spaced and clipped buckets count."""
  _, checkpoint, ref = golden
  assert ref["attention_mask"].sum(axis=1).max() > checkpoint.config.relative_attention_max_distance


def _normalised_score(model, params, inputs, hypotheses, eos_id):
  """sum of log-probs of each hypothesis (through its EOS) / its length, teacher-forced."""
  import jax
  dec = np.concatenate([np.zeros((len(hypotheses), 1), np.int32), hypotheses[:, :-1]], axis=1)
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, inputs, dec), -1))
  scores = []
  for b, row in enumerate(hypotheses):
    ends = np.where(row == eos_id)[0]
    n = ends[0] + 1 if len(ends) else len(row)
    scores.append(sum(logp[b, t, row[t]] for t in range(n)) / n)
  return np.array(scores)


def test_beam_search_is_at_least_as_good_as_the_reference(golden):
  """HF's beam search (num_beams=4, length_penalty=1, early_stopping=True) stops as soon as it has
  4 finished hypotheses and only accepts EOS among its top-4 candidates; ours searches until no
  live beam can win. So we require: same objective, our best score >= the reference's, and
  identical output wherever the reference's hypothesis is also our best."""
  _, checkpoint, ref = golden
  model = Transformer(checkpoint.config)
  ours, our_scores = decoding.beam_search(model, checkpoint.params, ref["input_ids"], beam_size=4,
                                          max_decode_length=ref["beam"].shape[1], length_penalty=1.0)
  ours, our_scores = np.asarray(ours), np.asarray(our_scores)
  eos = checkpoint.config.eos_id
  # Two code paths of ours (beam search's cached step-by-step scores against a teacher-forced
  # forward pass): not exact, different shapes and summation order. A mean token log-prob's
  # float32 error follows the logits' size (up to ~45), not its own (~0.1-1), hence absolute:
  # worst seen 1.1e-6; 1e-4 (~2e-6 x 45) is also the slack of the comparisons below.
  np.testing.assert_allclose(
      _normalised_score(model, checkpoint.params, ref["input_ids"], ours, eos), our_scores, atol=1e-4)
  reference_scores = _normalised_score(model, checkpoint.params, ref["input_ids"], ref["beam"], eos)
  assert (our_scores >= reference_scores - 1e-4).all(), (our_scores, reference_scores)
  same = np.abs(our_scores - reference_scores) <= 1e-4
  np.testing.assert_array_equal(ours[same], ref["beam"][same])
  assert same.sum() >= 3  # most rows agree exactly


def test_bfloat16_activations_track_float32(golden):
  """bfloat16 compute (params stay float32, norms and softmax in float32) stays close to float32."""
  _, checkpoint, ref = golden
  model = Transformer(checkpoint.config.replace(dtype="bfloat16"))
  logits = np.asarray(model.apply({"params": checkpoint.params}, ref["input_ids"],
                                  ref["decoder_input_ids"], ref["attention_mask"].astype(bool)))
  assert logits.dtype == np.float32
  valid = ref["decoder_mask"].astype(bool)
  ours, theirs = logits[valid], ref["logits"][valid]
  assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.995
  assert np.abs(ours - theirs).max() <= 0.1 * np.abs(theirs).max()
  # The tied variant has small top-1/top-2 margins at some teacher-forced positions.
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8
