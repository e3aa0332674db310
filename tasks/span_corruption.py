"""T5's span-corruption objective, on token ids, and a SeqIO task over the built-in suite's text.

A document of n tokens gets round(n * noise_density) noise tokens in round(noise /
mean_noise_span_length) spans (at least one), placed as T5's `random_spans_noise_mask` places
them: the noise and non-noise lengths are each split at random into that many non-empty
segments and interleaved, starting with non-noise. The inputs keep the non-noise tokens and
replace each noise span by a sentinel; the targets are each sentinel followed by its span.
Sentinels count down from the top of the model's vocabulary (`<extra_id_0>` = vocab_size - 1),
as T5's extra ids do.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError
from tasks import builtin_suite
from tasks.builtin_registry import builtin_vocabulary


def _segments(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `count` positive parts at random cut points."""
  cuts = np.sort(rng.choice(np.arange(1, total), count - 1, replace=False)) if count > 1 else np.array([], int)
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0) -> np.ndarray:
  """[length] bool: which tokens are noise."""
  if length < 2:
    return np.zeros(length, bool)
  num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
  num_spans = int(np.clip(round(num_noise / mean_noise_span_length), 1, min(num_noise, length - num_noise)))
  noise = _segments(num_noise, num_spans, rng)
  keep = _segments(length - num_noise, num_spans, rng)
  mask = np.zeros(length, bool)
  position = 0
  for k, n in zip(keep, noise):
    position += k
    mask[position:position + n] = True
    position += n
  return mask


def span_corrupt(ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) for token ids [n] and their noise mask [n] (no EOS; the task adds it)."""
  inputs, targets = [], []
  sentinel = vocab_size - 1
  previous = False
  for token, is_noise in zip(ids.tolist(), mask.tolist()):
    if is_noise and not previous:
      inputs.append(sentinel)
      targets.append(sentinel)
      sentinel -= 1
    (targets if is_noise else inputs).append(token)
    previous = is_noise
  return np.asarray(inputs, np.int32), np.asarray(targets, np.int32)


def register_builtin_span_corruption(model_vocab_size: int, name: str = "builtin_span_corruption",
                                     texts_per_prompt: int = 200, seed: int = 0,
                                     cache_dir: Optional[str] = None) -> str:
  """Registers `name`: span corruption of every text of the built-in suite's training prompts
  (inputs, targets and choices), tokenized with the suite's vocabulary; sentinels sit above
  that vocabulary, inside the model's `model_vocab_size`. Idempotent."""

  if name in seqio.TaskRegistry.names():
    return name
  vocabulary = seqio.SentencePieceVocabulary(builtin_vocabulary(cache_dir))
  if model_vocab_size - vocabulary.vocab_size < 20:
    raise UserInputError(f"model_vocab_size: {model_vocab_size} leaves fewer than 20 sentinel ids above "
                         f"the suite's {vocabulary.vocab_size}-piece vocabulary")

  corruption_seed = seed

  def dataset_fn(split, shuffle_files, seed=None):  # seqio fixes these argument names
    del shuffle_files, seed  # one fixed corruption per document; the trainer shuffles
    tf = tf_input.tensorflow()
    texts = [t for t in dict.fromkeys(builtin_suite.all_text(texts_per_prompt)) if t.strip()]
    order = np.random.default_rng(corruption_seed).permutation(len(texts))
    held = set(order[:len(texts) // 20].tolist())  # the same 5% of documents for validation
    rng = np.random.default_rng([corruption_seed, 0 if split == "train" else 1])
    chosen = [texts[i] for i in range(len(texts)) if (i in held) == (split == "validation")]
    pairs = []
    for text in chosen:
      ids = np.asarray(vocabulary.encode(text), np.int32)
      pairs.append(span_corrupt(ids, noise_mask(len(ids), rng), model_vocab_size))
    return tf.data.Dataset.from_generator(
        lambda: ({"inputs": x, "targets": y} for x, y in pairs),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})

  features = {"inputs": seqio.Feature(vocabulary, add_eos=True, dtype="int32"),
              "targets": seqio.Feature(vocabulary, add_eos=True, dtype="int32")}
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
                         output_features=features,
                         preprocessors=[seqio.preprocessors.append_eos_after_trim], metric_fns=[])
  return name
