"""Prompted examples held in Python -> a text-to-text task and a rank-classification twin."""

import pathlib

import numpy as np
import pytest
import seqio

from tasks import prompted, rank_classification

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")
ROWS = {
    "train": [{"inputs": "the cat sat . is it good ?", "targets": "yes",
               "answer_choices": ["yes", "no"], "label": 0},
              {"inputs": "the dog ran . is it good ?", "targets": "no",
               "answer_choices": ["yes", "no"], "label": 1}],
    "validation": [{"inputs": "a bird sang . is it good ?", "targets": "no",
                    "answer_choices": ["yes", "no", "maybe"], "label": 1}],
}


@pytest.fixture(scope="module")
def names():
  calls = []

  def rows_fn(split):
    calls.append(split)
    return ROWS[split]

  registered = prompted.register_prompted_task("test_prompted_good", rows_fn,
                                               seqio.SentencePieceVocabulary(SPM))
  assert calls == []  # registration generates nothing
  assert prompted.register_prompted_task("test_prompted_good", rows_fn,
                                         seqio.SentencePieceVocabulary(SPM)) == registered
  return registered


def test_text_to_text_task(names):
  task = seqio.TaskRegistry.get(names[0])
  examples = list(task.get_dataset(sequence_length={"inputs": 32, "targets": 8}, split="train",
                                   shuffle=False).as_numpy_iterator())
  assert [e["targets_pretokenized"].decode() for e in examples] == ["yes", "no"]
  assert all(e["inputs"][-1] == 1 and e["targets"][-1] == 1 for e in examples)  # EOS appended
  vocab = seqio.SentencePieceVocabulary(SPM)
  assert vocab.decode(examples[0]["inputs"].tolist()) == "the cat sat . is it good ?"


def test_score_eval_twin(names):
  task = seqio.TaskRegistry.get(names[1])
  assert names[1] == "test_prompted_good_score_eval"
  rows = list(task.get_dataset(sequence_length={"inputs": 32, "targets": 8}, split="validation",
                               shuffle=False).as_numpy_iterator())
  assert [r["idx"].tolist() for r in rows] == [[0, 0], [0, 1], [0, 2]]
  assert [bool(r["is_correct"]) for r in rows] == [False, True, False]
  targets = [task.postprocess_fn(None, example=r, is_target=True) for r in rows]
  metric = task.score_metric_fns[0](targets, np.array([-1.0, -0.5, -3.0]))
  assert metric["accuracy"] == 100.0


def test_missing_choices_in_a_score_eval_task():
  bad = prompted.register_prompted_task(
      "test_prompted_bad", lambda split: [{"inputs": "x", "targets": "y"}],
      seqio.SentencePieceVocabulary(SPM), source="my_rows.jsonl")
  task = seqio.TaskRegistry.get(bad[1])
  with pytest.raises(rank_classification.RankClassificationError,
                     match=r"my_rows.jsonl \(train\): example 0: field 'answer_choices' is missing"):
    task.get_dataset(sequence_length=None, split="train")
