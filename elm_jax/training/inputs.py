"""Input pipelines of the trainer: one endless, deterministic stream of stacked batches
[E, batch, length], each expert's rows from its own SeqIO task or mixture.

`check_tasks` refuses unknown tasks (and vocabularies larger than the model's) without reading
data; `expert_batches` builds the stream. Which rows fill each step's batch, in which order, is
`tasks.row_order`'s: a new permutation of an expert's sampled rows every epoch (seeded from the
run's seed and the expert's name, so an expert reads the same rows alone or in any group), read
by index, so a process reads only its own rows of each batch and a restored run starts reading at
its step. Each expert's examples are cut to fixed lengths by `unpacked_encdec_features`.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import jax
import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.training.config import TrainConfig
from elm_jax.training.errors import TrainingError
from tasks import row_order

FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights")


def check_tasks(tasks: Sequence[str], vocab_size: Optional[int] = None) -> list:
  """The SeqIO task or mixture of each name, refused when one is not registered or (with
  `vocab_size`, the model's) uses a larger vocabulary; reads no data."""
  providers = []
  for name in tasks:
    try:
      provider = seqio.get_mixture_or_task(name)
    except ValueError:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} is not a registered SeqIO task or "
                          "mixture (see `elm-jax tasks list`)") from None
    task_vocab = provider.output_features["targets"].vocabulary.vocab_size
    if vocab_size is not None and task_vocab > vocab_size:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} uses a vocabulary of {task_vocab} "
                          f"tokens, more than the model's vocab_size {vocab_size}")
    providers.append(provider)
  return providers


def expert_batches(config: TrainConfig, vocab_size: Optional[int] = None, *,
                   experts: slice = slice(None), rows: slice = slice(None),
                   start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """An endless, deterministic stream of stacked batches [E, batch, length] from step
  `start_step` on, or of the block of them `experts` x `rows` (a process of a multi-process run
  reads only its own experts' rows of each batch). Every task is checked now (`check_tasks`);
  the input pipelines are built when the first batch is asked for."""
  check_tasks(config.expert_tasks, vocab_size)
  return _stacked_stream(config, experts, rows, start_step)


def _stacked_stream(config: TrainConfig, experts: slice, rows: slice,
                    start_step: int) -> Iterator[dict[str, np.ndarray]]:
  tf_input.tensorflow()
  lengths = {"inputs": config.input_length, "targets": config.target_length}
  options = _input_options(config.input_prefetch)
  seeds = config.expert_seeds()
  iterators = []
  for e in range(len(config.expert_tasks))[experts]:
    ds = row_order.expert_dataset(
        config.expert_tasks[e], split=config.split, seed=seeds[e], batch_size=config.batch_size,
        rows=rows, start_step=start_step, lengths=lengths,
        convert=lambda ds, name: unpacked_encdec_features(ds, lengths, name))
    iterators.append(ds.with_options(options).as_numpy_iterator())
  for batches in zip(*iterators):
    yield {k: np.stack([b[k] for b in batches]) for k in FEATURES}


def batch_shapes(config: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one `expert_batches` element."""
  num = len(config.expert_tasks)
  return {k: jax.ShapeDtypeStruct((num, config.batch_size, config.input_length if k == "encoder_input_tokens"
                                   else config.target_length), np.int32) for k in FEATURES}


def unpacked_encdec_features(ds, lengths: dict[str, int], name: str, eos_id: int = 1):
  """What `seqio.EncDecFeatureConverter(pack=False)` makes of a task's dataset, in one map:
  inputs and targets trimmed (an over-long one that ends in EOS keeps its EOS, as the paper's
  tokenizer truncates; SeqIO's converter drops it) and zero-padded to `lengths`, decoder inputs the targets shifted
  right after a 0 (BOS), loss weights 1 on non-padding targets; all int32 (the test compares
  the two). SeqIO's converter builds a dozen validation and conversion maps per call, about
  0.2 s of graph tracing for each of hundreds of experts."""
  tf = tf_input.tensorflow()
  for key in ("inputs", "targets"):
    spec = ds.element_spec.get(key) if isinstance(ds.element_spec, dict) else None
    if spec is None or spec.shape.rank != 1 or not spec.dtype.is_integer:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} yields {key!r} as "
                          f"{spec if spec is not None else 'nothing'}; expected a rank-1 integer "
                          "tensor of token ids (a tokenized text-to-text task)")
  li, lt = lengths["inputs"], lengths["targets"]

  def pad(tokens, length):
    # Cut as the paper's tokenizer cuts (truncation keeps the closing EOS): a longer sequence
    # that ends in EOS keeps its first length - 1 tokens and the EOS.
    tokens = tf.cast(tokens, tf.int32)
    ends_in_eos = tf.logical_and(tf.shape(tokens)[0] > length,
                                 tf.reduce_any(tf.equal(tokens[-1:], eos_id)))
    tokens = tf.cond(ends_in_eos, lambda: tf.concat([tokens[:length - 1], tokens[-1:]], 0),
                     lambda: tokens[:length])
    return tf.ensure_shape(tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]]), [length])

  def convert(example):
    inputs, targets = pad(example["inputs"], li), pad(example["targets"], lt)
    return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_input_tokens": tf.concat([tf.zeros([1], tf.int32), targets[:-1]], 0),
            "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.int32)}
  return ds.map(convert)


def _input_options(prefetch: Optional[bool]):
  tf = tf_input.tensorflow()
  options = tf.data.Options()
  if prefetch is None:
    prefetch = jax.default_backend() != "cpu"
  if not prefetch:
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    options.threading.private_threadpool_size = 1
  return options


