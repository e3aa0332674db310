"""Continual generative tasks from local JSON: fields, the 300-example eval cut, bad rows."""

import json
import pathlib

import pytest
import seqio

from tasks import continual, raw_sources

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")


def test_register_and_read(tmp_path):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"src": f"simplify: long sentence {i}", "tgt": f"short {i}"}) + "\n"
                           for i in range(5)))
  evaluation = tmp_path / "eval.json"
  evaluation.write_text(json.dumps([{"src": f"simplify: s{i}", "tgt": f"t{i}"} for i in range(400)]))
  name = continual.register_continual_task(
      "test_continual_simplify", {"train": str(train), "validation": str(evaluation)},
      seqio.SentencePieceVocabulary(SPM), inputs_field="src", targets_field="tgt")
  task = seqio.TaskRegistry.get(name)
  train_rows = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  assert [r["targets_pretokenized"].decode() for r in train_rows] == [f"short {i}" for i in range(5)]
  eval_rows = list(task.get_dataset(sequence_length=None, split="validation", shuffle=False).as_numpy_iterator())
  assert len(eval_rows) == 300
  again = continual.continual_rows(str(evaluation), "src", "tgt", limit=300, seed=42)
  assert [r["targets"] for r in again] == [r["targets_pretokenized"].decode() for r in eval_rows]


def test_missing_field_names_file_and_example(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
  with pytest.raises(raw_sources.RawDataError, match="bad.jsonl: example 1: field 'target' must be a string"):
    continual.continual_rows(str(bad))
