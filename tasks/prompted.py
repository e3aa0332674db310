"""SeqIO tasks from prompted examples held in Python (rendered templates, BIG-bench, continual JSON).

A rows function `rows_fn(split) -> list[{"inputs", "targets", "answer_choices"?, "label"?}]`
becomes two tasks, as T0 registers P3:
- `name`: text-to-text (inputs -> targets), for training and generation;
- `name + "_score_eval"` (when examples carry `answer_choices`): one row per choice with
  `idx`, `is_correct`, `weight`, scored by rank classification.
Rows are produced when a dataset is requested, never at registration.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import seqio

from elm_jax import tf_input
from tasks import rank_classification

RowsFn = Callable[[str], list[dict[str, Any]]]


def _output_features(vocabulary):
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def _text_dataset(rows: list[dict[str, Any]]):
  tf = tf_input.tensorflow()
  return tf.data.Dataset.from_tensor_slices({
      "inputs": tf.constant([r["inputs"] for r in rows], tf.string),
      "targets": tf.constant([r["targets"] for r in rows], tf.string),
  })


def _score_dataset(rows: list[dict[str, Any]], source: str):
  tf = tf_input.tensorflow()
  expanded = []
  for i, row in enumerate(rows):
    if not row.get("answer_choices"):
      raise rank_classification.RankClassificationError(
          f"{source}: example {i}: field 'answer_choices' is missing; a _score_eval task needs "
          "the choices of every example")
    expanded.extend(rank_classification.expand_choices(
        i, row["inputs"], row["answer_choices"], row["label"], source=source))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": tf.constant([r["inputs"] for r in expanded], tf.string),
      "targets": tf.constant([r["targets"] for r in expanded], tf.string),
      "idx": tf.constant([r["idx"] for r in expanded], tf.int32, shape=[len(expanded), 2]),
      "is_correct": tf.constant([r["is_correct"] for r in expanded], tf.bool),
      "weight": tf.constant([r["weight"] for r in expanded], tf.float32),
  })


def register_prompted_task(name: str, rows_fn: RowsFn, vocabulary, *,
                           splits: Sequence[str] = ("train", "validation"),
                           score_eval: bool = True, source: Optional[str] = None) -> list[str]:
  """Registers `name` (and `name_score_eval` if `score_eval`); returns the names registered.
  Idempotent: names already registered are left as they are."""

  source = source or name
  names = []
  preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: _text_dataset(rows_fn(split)), splits=splits),
        output_features=_output_features(vocabulary), preprocessors=preprocessors, metric_fns=[])
  names.append(name)
  if score_eval:
    eval_name = f"{name}_score_eval"
    if eval_name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          eval_name, source=seqio.FunctionDataSource(
              lambda split, shuffle_files, seed=None: _score_dataset(rows_fn(split), f"{source} ({split})"),
              splits=splits),
          output_features=_output_features(vocabulary), preprocessors=preprocessors,
          postprocess_fn=rank_classification.rank_classification_postprocessor,
          metric_fns=[rank_classification.seqio_rank_classification])
    names.append(eval_name)
  return names
