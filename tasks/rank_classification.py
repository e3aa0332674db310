"""Rank classification with T5's semantics: preprocessor, postprocessor and metric.

Eval mode expands an example with C choices into C examples, each carrying
`idx = [example_index, choice_index]`, `is_correct` and `weight`; train mode keeps only the
correct choice(s). The metric groups scored rows by example, takes the argmax over choices, and
reports accuracy (and macro F1 when the number of classes is known).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from elm_jax import tf_input
from elm_jax.errors import UserInputError


class RankClassificationError(UserInputError):
  """An example the protocol cannot score (too few choices, duplicated index, ...)."""


def expand_choices(example_index: int, inputs: str, choices: Sequence[str],
                   correct: Sequence[int] | int, *, mode: str = "eval", weight: float = 1.0,
                   source: str = "<examples>") -> list[dict[str, Any]]:
  """One example -> its rank-classification rows (pure Python; the tf.data map below uses it).

  `correct` is the index (or indices) of the correct choice(s). Rows: {"idx": [example, choice],
  "inputs", "targets", "is_correct", "weight"}.
  """
  if mode not in ("eval", "train"):
    raise RankClassificationError(f"mode: expected 'eval' or 'train', got {mode!r}")
  if len(choices) < 2:
    raise RankClassificationError(
        f"{source}: example {example_index}: field 'answer_choices' has {len(choices)} choice(s); "
        "rank classification needs at least 2")
  correct_set = {int(correct)} if np.isscalar(correct) else {int(c) for c in correct}
  bad = [c for c in correct_set if not 0 <= c < len(choices)]
  if bad or not correct_set:
    raise RankClassificationError(
        f"{source}: example {example_index}: field 'label' is {sorted(correct_set)}; expected an "
        f"index into its {len(choices)} choices")
  rows = []
  for j, choice in enumerate(choices):
    is_correct = j in correct_set
    if mode == "train" and not is_correct:
      continue
    rows.append({"idx": [example_index, j], "inputs": inputs, "targets": choice,
                 "is_correct": is_correct, "weight": float(weight)})
  return rows


def rank_classification_preprocessor(dataset, *, inputs_fn: Callable, choices_fn: Callable,
                                     correct_fn: Callable, mode: str = "eval",
                                     weight_fn: Optional[Callable] = None, source: str = "<dataset>"):
  """tf.data version: maps examples to rank-classification rows (see `expand_choices`).

  `inputs_fn(ex) -> str tensor`, `choices_fn(ex) -> [C] str tensor`, `correct_fn(ex) -> int
  tensor` (index of the correct choice). Examples with fewer than 2 choices raise an error that
  names `source` and the example index when the dataset is iterated.
  """
  tf = tf_input.tensorflow()

  if mode not in ("eval", "train"):
    raise RankClassificationError(f"mode: expected 'eval' or 'train', got {mode!r}")

  def expand(index, ex):
    choices = choices_fn(ex)
    num = tf.shape(choices)[0]
    correct = tf.cast(correct_fn(ex), tf.int32)
    check = tf.debugging.Assert(
        num >= 2, [f"{source}: field 'answer_choices' needs at least 2 choices for rank "
                   "classification; example index and choice count:", index, num])
    with tf.control_dependencies([check]):
      choice_ids = tf.range(num)
    weight = tf.cast(weight_fn(ex), tf.float32) if weight_fn else tf.constant(1.0)
    rows = {
        "idx": tf.stack([tf.fill([num], tf.cast(index, tf.int32)), choice_ids], axis=1),
        "inputs": tf.fill([num], inputs_fn(ex)),
        "targets": choices,
        "is_correct": tf.equal(choice_ids, correct),
        "weight": tf.fill([num], weight),
    }
    rows = tf.data.Dataset.from_tensor_slices(rows)
    if mode == "train":
      rows = rows.filter(lambda r: r["is_correct"])
    return rows

  return dataset.enumerate().flat_map(expand)


def group_scores(idx: np.ndarray, scores: np.ndarray, is_correct: np.ndarray
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows [R, 2] / [R] / [R] -> per example (scores [C], is_correct [C]) in example order.

  Duplicated (example, choice) indices, as multi-host sharding with padding produces, are an
  error rather than silently double-counted.
  """
  idx = np.asarray(idx).reshape(-1, 2)
  seen: dict[tuple[int, int], int] = {}
  by_example: dict[int, dict[int, tuple[float, bool]]] = collections.defaultdict(dict)
  for row, (example, choice) in enumerate(idx.tolist()):
    if (example, choice) in seen:
      raise RankClassificationError(
          f"rank classification: idx [{example}, {choice}] appears twice (rows {seen[(example, choice)]} "
          f"and {row}); deduplicate predictions gathered from several hosts before scoring")
    seen[(example, choice)] = row
    by_example[example][choice] = (float(scores[row]), bool(is_correct[row]))
  grouped = []
  for example in sorted(by_example):
    choices = by_example[example]
    order = sorted(choices)
    grouped.append((np.array([choices[c][0] for c in order]), np.array([choices[c][1] for c in order])))
  return grouped


def rank_classification_metric(idx: np.ndarray, scores: np.ndarray, is_correct: np.ndarray,
                               num_classes: Optional[int] = None) -> dict[str, float]:
  """Accuracy (%) of the argmax choice per example (first maximum on ties); with `num_classes`
  (choices are the same classes for every example), also macro F1 (%)."""
  grouped = group_scores(idx, scores, is_correct)
  if not grouped:
    raise RankClassificationError("rank classification: no scored examples")
  predictions = [int(np.argmax(s)) for s, _ in grouped]
  hits = [bool(c[p]) for (_, c), p in zip(grouped, predictions)]
  result = {"accuracy": 100.0 * float(np.mean(hits)), "examples": float(len(grouped))}
  if num_classes is not None:
    labels = [int(np.argmax(c)) for _, c in grouped]
    result["f1"] = 100.0 * macro_f1(labels, predictions, num_classes)
  return result


def macro_f1(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> float:
  """Unweighted mean over classes of F1 (a class never predicted nor present scores 0)."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  scores = []
  for k in range(num_classes):
    tp = np.sum((predictions == k) & (labels == k))
    fp = np.sum((predictions == k) & (labels != k))
    fn = np.sum((predictions != k) & (labels == k))
    scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores))


def summarize_over_prompts(results: Mapping[tuple[str, str], float]) -> dict[str, dict[str, float]]:
  """{(dataset, prompt): score} -> {dataset: {"mean", "median", "prompts"}} (T0 reports medians,
  the ELM paper means)."""
  per_dataset: dict[str, list[float]] = collections.defaultdict(list)
  for (dataset, _), score in results.items():
    per_dataset[dataset].append(float(score))
  return {d: {"mean": float(np.mean(v)), "median": float(np.median(v)), "prompts": float(len(v))}
          for d, v in sorted(per_dataset.items())}


def rows_from_examples(examples: Iterable[tuple[str, Sequence[str], int]], mode: str = "eval",
                       source: str = "<examples>") -> list[dict[str, Any]]:
  """(inputs, choices, correct index) triples -> rank-classification rows, indexed in order."""
  rows = []
  for i, (inputs, choices, correct) in enumerate(examples):
    rows.extend(expand_choices(i, inputs, choices, correct, mode=mode, source=source))
  return rows


def rank_classification_postprocessor(output_or_target, example=None, is_target=False):
  """SeqIO postprocess_fn for `_score_eval` tasks: targets become (idx, is_correct, weight)."""
  if is_target:
    return (tuple(int(i) for i in example["idx"]), bool(example["is_correct"]),
            float(example.get("weight", 1.0)))
  return output_or_target


def seqio_rank_classification(targets: Sequence[tuple], scores: Sequence[float],
                              num_classes: Optional[int] = None) -> dict[str, float]:
  """SeqIO score metric over the postprocessed targets (idx, is_correct, weight) and scores."""
  idx = np.array([t[0] for t in targets]).reshape(-1, 2)
  is_correct = np.array([t[1] for t in targets])
  return rank_classification_metric(idx, np.asarray(scores, np.float64), is_correct, num_classes)
