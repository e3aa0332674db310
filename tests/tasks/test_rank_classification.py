"""Rank classification: T5-style expansion, and the metric against a direct computation."""

import numpy as np
import pytest

from tasks import rank_classification as rc


def _direct_accuracy(examples):
  """examples: list of (scores, correct index). First maximum wins ties."""
  hits = 0
  for scores, correct in examples:
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))
    hits += best == correct
  return 100.0 * hits / len(examples)


def _rows(examples, shuffle_seed=None):
  idx, scores, correct = [], [], []
  for i, (s, c) in enumerate(examples):
    for j, v in enumerate(s):
      idx.append([i, j]); scores.append(v); correct.append(j == c)
  idx, scores, correct = np.array(idx), np.array(scores), np.array(correct)
  if shuffle_seed is not None:  # row order must not matter
    perm = np.random.default_rng(shuffle_seed).permutation(len(idx))
    idx, scores, correct = idx[perm], scores[perm], correct[perm]
  return idx, scores, correct


EXAMPLES = [
    ([-1.0, -2.0], 0),                 # right
    ([-3.0, -1.0, -2.0], 0),           # wrong, 3 choices
    ([-5.0, -5.0, -6.0, -9.0], 1),     # tie between 0 and 1: first maximum (0) wins -> wrong
    ([-5.0, -5.0], 0),                 # tie, first is correct -> right
    ([-0.5, -0.1, -0.3], 1),           # right
]


def test_accuracy_matches_direct_computation_with_ties_and_uneven_choices():
  idx, scores, correct = _rows(EXAMPLES, shuffle_seed=3)
  result = rc.rank_classification_metric(idx, scores, correct)
  assert result["accuracy"] == pytest.approx(_direct_accuracy(EXAMPLES)) == pytest.approx(60.0)
  assert result["examples"] == 5


def test_random_scores_match_direct_computation():
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(200):
    c = int(rng.integers(2, 6))
    scores = list(np.round(rng.normal(size=c), 1))  # rounding makes ties common
    examples.append((scores, int(rng.integers(0, c))))
  idx, scores, correct = _rows(examples, shuffle_seed=1)
  assert rc.rank_classification_metric(idx, scores, correct)["accuracy"] == pytest.approx(
      _direct_accuracy(examples))


def test_macro_f1_by_hand():
  # labels 0,0,1,1 ; predictions 0,1,1,1 -> class0 F1 = 2/3, class1 F1 = 0.8 -> mean 0.7333
  examples = [([0.0, -1.0], 0), ([-1.0, 0.0], 0), ([-1.0, 0.0], 1), ([-1.0, 0.0], 1)]
  result = rc.rank_classification_metric(*_rows(examples), num_classes=2)
  assert result["accuracy"] == pytest.approx(75.0)
  assert result["f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_duplicated_indices_are_an_error():
  idx, scores, correct = _rows(EXAMPLES)
  idx = np.concatenate([idx, idx[:1]])
  scores, correct = np.concatenate([scores, scores[:1]]), np.concatenate([correct, correct[:1]])
  with pytest.raises(rc.RankClassificationError, match=r"idx \[0, 0\] appears twice"):
    rc.rank_classification_metric(idx, scores, correct)


def test_expand_choices_eval_and_train():
  rows = rc.expand_choices(7, "Is it good?", ["yes", "no", "maybe"], 1, weight=2.0)
  assert [r["idx"] for r in rows] == [[7, 0], [7, 1], [7, 2]]
  assert [r["is_correct"] for r in rows] == [False, True, False]
  assert {r["inputs"] for r in rows} == {"Is it good?"} and rows[2]["targets"] == "maybe"
  assert all(r["weight"] == 2.0 for r in rows)
  train = rc.expand_choices(7, "Is it good?", ["yes", "no", "maybe"], 1, mode="train")
  assert [(r["idx"], r["targets"]) for r in train] == [([7, 1], "no")]


@pytest.mark.parametrize("choices", [[], ["only"]])
def test_zero_or_one_choice_names_file_example_and_field(choices):
  with pytest.raises(rc.RankClassificationError,
                     match="data.jsonl: example 4: field 'answer_choices' has"):
    rc.expand_choices(4, "x", choices, 0, source="data.jsonl")


def test_correct_index_out_of_range():
  with pytest.raises(rc.RankClassificationError, match="example 2: field 'label' is \\[5\\]"):
    rc.expand_choices(2, "x", ["a", "b"], 5)


def test_tf_preprocessor_matches_python_expansion():
  import tensorflow as tf
  data = [("q0", ["a", "b"], 1), ("q1", ["c", "d", "e"], 2)]
  ds = tf.data.Dataset.from_generator(
      lambda: ({"q": q, "choices": c, "label": l} for q, c, l in data),
      output_signature={"q": tf.TensorSpec([], tf.string), "choices": tf.TensorSpec([None], tf.string),
                        "label": tf.TensorSpec([], tf.int64)})
  for mode in ("eval", "train"):
    out = rc.rank_classification_preprocessor(
        ds, inputs_fn=lambda ex: ex["q"], choices_fn=lambda ex: ex["choices"],
        correct_fn=lambda ex: ex["label"], mode=mode)
    got = [(r["idx"].tolist(), r["inputs"].decode(), r["targets"].decode(), bool(r["is_correct"]))
           for r in out.as_numpy_iterator()]
    want = [(r["idx"], r["inputs"], r["targets"], r["is_correct"])
            for r in rc.rows_from_examples(data, mode=mode)]
    assert got == want


def test_tf_preprocessor_refuses_a_single_choice():
  import tensorflow as tf
  ds = tf.data.Dataset.from_tensor_slices({"q": ["x"], "choices": [["only"]], "label": [0]})
  out = rc.rank_classification_preprocessor(
      ds, inputs_fn=lambda ex: ex["q"], choices_fn=lambda ex: ex["choices"],
      correct_fn=lambda ex: ex["label"], source="p3/copa")
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"p3/copa: field .{1,2}answer_choices.* needs at least 2 choices.*\[0\] \[1\]"):
    list(out.as_numpy_iterator())


def test_summarize_over_prompts():
  summary = rc.summarize_over_prompts({("rte", "a"): 50.0, ("rte", "b"): 60.0, ("rte", "c"): 100.0,
                                       ("cb", "a"): 40.0})
  assert summary["rte"] == {"mean": 70.0, "median": 60.0, "prompts": 3.0}
  assert summary["cb"]["median"] == 40.0
