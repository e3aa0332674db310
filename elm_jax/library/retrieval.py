"""Retrieval of Experts (RoE): the embedders, the retrieval keys and the vote.

RoE as the paper's `run_retrieval.py` does it: each expert's stored training instances are keys
(embedded once and cached in the library); each of 32 unlabeled target inputs, written in the
same text format, retrieves its top-1 key by inner product of L2-normalised embeddings (cosine);
the key's expert gets a vote; experts are ranked by votes. Ties are broken deterministically:
by the first query that voted for the expert (the paper's stable sort over first-seen order),
then by library order. Embedders: all-MiniLM-L6-v2 (the paper's "ST"), the backbone's own
encoder (mean-pooled), or BM25 over whitespace tokens (BM25Okapi, as `rank_bm25`).

RoE is one of the methods of `library/selection.py` (with the likelihood and oracle rankings it
is compared with), which `elm-jax retrieve`, the demo and notebooks call.
"""

from __future__ import annotations

import collections
import functools
import io
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from elm_jax import batching, defaults, files, partitioning
from elm_jax.errors import UserInputError
from elm_jax.library.loaded import load_backbone
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.minilm import MiniLMEmbedder
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config
from elm_jax.vocabularies import SentencePieceVocabulary
from tasks import instances

EMBEDDERS = ("minilm", "t5", "bm25")
KEY_MAX_LENGTH, QUERY_MAX_LENGTH = 256, 512


class RetrievalError(UserInputError):
  """A retrieval request the library cannot answer (no keys, no vocabulary beside the backbone,
  an unreadable embedding cache)."""


# ---------------------------------------------------------------------------- embedders
class T5EncoderEmbedder:
  """Mean-pooled, L2-normalised outputs of a T5 encoder (`EncoderDecoderModel.encode_mean`):
  texts -> [N, emb_dim] float32, in length-sorted, bucketed batches."""
  name = "t5"

  def __init__(self, model: EncoderDecoderModel, params, vocabulary, batch_size: int = defaults.BATCH_SIZE):
    self.model, self.params, self.vocabulary, self.batch_size = model, params, vocabulary, batch_size

  def embed(self, texts: Sequence[str], max_length: int = KEY_MAX_LENGTH) -> np.ndarray:
    ids = [self.vocabulary.encode(t)[:max_length - 1] + [self.model.config.eos_id] for t in texts]
    out = np.zeros((len(texts), self.model.config.emb_dim), np.float32)
    for rows, tokens in batching.padded_batches(ids, self.batch_size, 16, max_length):
      out[rows] = np.asarray(encoder_mean_pool(self.model, self.params, tokens))[:len(rows)]
    return out


@functools.partial(jax.jit, static_argnames=("model",))
def encoder_mean_pool(model: EncoderDecoderModel, params, tokens: jax.Array) -> jax.Array:
  """`EncoderDecoderModel.encode_mean`, compiled: tokens [N, L] -> [N, emb]."""
  return model.encode_mean(params, tokens)


def backbone_embedder(library: ExpertLibrary, checkpoint: Optional[str] = None,
                      config: Optional[T5Config] = None) -> T5EncoderEmbedder:
  """The library's backbone encoder (checked against its fingerprint) as an embedder."""
  loaded, _ = load_backbone(library, checkpoint, config=config)
  if loaded.vocab_path is None:
    raise RetrievalError(f"{loaded.source}: no spiece.model beside the backbone")
  return T5EncoderEmbedder(loaded.model, loaded.params, SentencePieceVocabulary(loaded.vocab_path))


class MiniLMTextEmbedder:
  name = "minilm"

  def __init__(self, model_dir: Optional[str] = None, batch_size: int = defaults.BATCH_SIZE):
    self._embedder = MiniLMEmbedder(model_dir, batch_size=batch_size)  # 32: one RoE query set

  def embed(self, texts: Sequence[str], max_length: int = KEY_MAX_LENGTH) -> np.ndarray:
    return self._embedder.embed(list(texts), max_length=max_length)


class BM25:
  """Okapi BM25 over lower-cased whitespace tokens (k1 1.5, b 0.75; negative idf floored at
  epsilon x mean idf, as rank_bm25.BM25Okapi), with an inverted index so a query touches only
  the documents that share a token with it."""

  def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
    counts = [collections.Counter(d.lower().split()) for d in documents]
    self.num_docs = len(counts)
    lengths = np.array([sum(c.values()) for c in counts], np.float64)
    avgdl = float(lengths.mean()) if self.num_docs else 0.0
    self.k1 = k1
    self.norm = k1 * (1 - b + b * lengths / max(avgdl, 1e-12))   # [documents]
    postings: dict[str, tuple[list[int], list[int]]] = {}
    for doc, c in enumerate(counts):
      for token, tf in c.items():
        ids, tfs = postings.setdefault(token, ([], []))
        ids.append(doc)
        tfs.append(tf)
    self.postings = {t: (np.array(ids), np.array(tfs, np.float64)) for t, (ids, tfs) in postings.items()}
    idf = {t: math.log(self.num_docs - len(ids) + 0.5) - math.log(len(ids) + 0.5)
           for t, (ids, _) in self.postings.items()}
    floor = epsilon * (sum(idf.values()) / len(idf)) if idf else 0.0
    self.idf = {t: (v if v >= 0 else floor) for t, v in idf.items()}

  def scores(self, query: str) -> np.ndarray:
    """[documents] BM25 score of each document for `query` (query tokens count each time they occur)."""
    out = np.zeros(self.num_docs)
    for token in query.lower().split():
      if token in self.postings:
        ids, tf = self.postings[token]
        out[ids] += self.idf[token] * tf * (self.k1 + 1) / (tf + self.norm[ids])
    return out


# ---------------------------------------------------------------------------- keys
def library_keys(library: ExpertLibrary, names: Sequence[str], text_format: str
                 ) -> tuple[list[str], np.ndarray]:
  """(key texts [K], owner expert index [K]) of the named experts, in their order."""
  texts, owners = [], []
  for e, name in enumerate(names):
    for key in library.keys(name):
      texts.append(instances.format_text(key, text_format))
      owners.append(e)
  if not texts:
    raise RetrievalError(f"{library.root}: the selected experts have no retrieval keys")
  return texts, np.asarray(owners, np.int64)


def key_embeddings(library: ExpertLibrary, names: Sequence[str], embedder, text_format: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings [K, dim], owners [K]); each expert's are cached in the library the first time
  they are computed (new files only: an expert added later never changes another's). The keys
  of every expert not cached yet are embedded in one call, so batches are full and sorted by
  length across experts (one call per expert padded each expert's few keys to a whole batch)."""
  blocks: dict[str, np.ndarray] = {}
  missing: list[str] = []
  for name in names:
    path = library.embeddings_path(name, embedder.name, text_format)
    if path.exists():
      blocks[name] = _cached_block(path, len(library.keys(name)))
    else:
      missing.append(name)
  if missing:
    texts = [[instances.format_text(k, text_format) for k in library.keys(name)] for name in missing]
    embedded = embedder.embed([t for group in texts for t in group], KEY_MAX_LENGTH)
    start = 0
    for name, group in zip(missing, texts):
      block = embedded[start:start + len(group)].astype(np.float32)
      start += len(group)
      path = library.embeddings_path(name, embedder.name, text_format)
      if partitioning.is_primary():  # the cache has one writer; every process computed the same
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, block)
        files.write_atomically(path, buffer.getvalue())
      blocks[name] = block
  vectors = [blocks[name] for name in names]
  owners = [e for e, block in enumerate(vectors) for _ in range(len(block))]
  return np.concatenate(vectors), np.asarray(owners, np.int64)


def _cached_block(path, num_keys: int) -> np.ndarray:
  """A cached [keys, dim] float32 embedding block, refused (naming the file) when it is not
  one: unreadable, of another shape, or not finite. It is a cache: deleting it recomputes it."""
  try:
    block = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise RetrievalError(f"{path}: not a readable .npy embedding cache ({e}); delete it and it "
                         "is computed again") from None
  if block.dtype != np.float32 or block.ndim != 2 or block.shape[0] != num_keys or not np.isfinite(block).all():
    raise RetrievalError(f"{path}: expected finite float32 embeddings [{num_keys} keys, dim], got "
                         f"{block.dtype} {list(block.shape)}; delete it and it is computed again")
  return block


# ---------------------------------------------------------------------------- rankings
def vote_ranking(similarity: np.ndarray, owners: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
  """similarity [Q, K] -> experts ranked by top-1 votes: [{"expert", "votes"}], every expert
  listed (zero-vote experts last, in library order)."""
  top = np.argmax(similarity, axis=1)  # first maximum on exact ties: the earlier key
  voters = owners[top]
  votes = np.bincount(voters, minlength=len(names))
  first_vote = {int(e): q for q, e in reversed(list(enumerate(voters)))}
  order = sorted(range(len(names)), key=lambda e: (-votes[e], first_vote.get(e, len(voters)), e))
  return [{"expert": names[e], "votes": int(votes[e])} for e in order]


def roe_ranking(library: ExpertLibrary, names: Sequence[str], queries: Sequence[dict[str, Any]], *,
                embedder=None, bm25: bool = False, text_format: str = instances.DEFAULT_TEXT_FORMAT
                ) -> list[dict[str, Any]]:
  """RoE: each query's top-1 key votes for its expert."""
  query_texts = [instances.format_text(q, text_format) for q in queries]
  if bm25:
    key_texts, owners = library_keys(library, names, text_format)
    index = BM25(key_texts)
    similarity = np.stack([index.scores(q) for q in query_texts])
  else:
    keys, owners = key_embeddings(library, names, embedder, text_format)
    similarity = embedder.embed(query_texts, QUERY_MAX_LENGTH) @ keys.T
  return vote_ranking(similarity, owners, names)
