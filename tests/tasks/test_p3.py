"""P3 as published: tiny TFRecord shards + info.<split>.json files made here, read through a
registered SeqIO task into the batches the T5 consumes (EncDecFeatureConverter, packed and not)."""

import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from tasks import p3
from tests.helpers.p3_data import SCORE_FEATURES, TRAIN_FEATURES, make_examples, write_subset

@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("p3"))
  write_subset(root, "super_glue_cb_can_we_infer", "train", TRAIN_FEATURES, make_examples(10))
  write_subset(root, "super_glue_cb_can_we_infer_score_eval", "validation", SCORE_FEATURES,
               make_examples(6, score=True), shards=1)
  return root


def test_registered_task_reads_features_as_the_info_file_says(root):
  task = p3.register_p3_task("super_glue_cb_can_we_infer", data_dir=root, task_name="test_p3_cb")
  examples = list(task.get_dataset(split="train", shuffle=False).as_numpy_iterator())
  assert len(examples) == 10
  first = examples[0]
  assert first["inputs"].dtype == np.int32 and first["inputs"][-1] == 1
  assert first["answer_choices"].tolist() == [b"yes", b"no"]
  assert {e["inputs_pretokenized"].decode() for e in examples} == {f"question {i}" for i in range(10)}


def test_score_eval_subset_has_idx_is_correct_weight(root):
  task = p3.register_p3_task("super_glue_cb_can_we_infer_score_eval", data_dir=root,
                             task_name="test_p3_cb_score")
  rows = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
  assert [r["idx"].tolist() for r in rows] == [[i // 2, i % 2] for i in range(6)]
  assert rows[0]["is_correct"].dtype == np.bool_ and rows[0]["weight"].dtype == np.float32


@pytest.mark.parametrize("pack", [False, True])
def test_batches_for_the_t5(root, pack):
  task = p3.register_p3_task("super_glue_cb_can_we_infer", data_dir=root, task_name="test_p3_cb")
  ds = task.get_dataset(sequence_length={"inputs": 16, "targets": 4}, split="train", shuffle=False)
  converted = seqio.EncDecFeatureConverter(pack=pack)(ds, {"inputs": 16, "targets": 4})
  batch = next(converted.batch(4).as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, 16)
  assert batch["decoder_target_tokens"].shape == (4, 4)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)
  if pack:
    assert "encoder_segment_ids" in batch and batch["encoder_segment_ids"].max() >= 2
  else:
    assert batch["decoder_target_tokens"][0].tolist()[:2] in ([5, 1], [6, 1])


def test_missing_root_subset_and_split_name_the_path(tmp_path, monkeypatch):
  monkeypatch.delenv(p3.P3_DATA_DIR_ENV, raising=False)
  with pytest.raises(p3.P3DataError, match="ELM_P3_DATA_DIR"):
    p3.p3_data_root()
  with pytest.raises(p3.P3DataError, match="nowhere: P3 data directory not found"):
    p3.p3_data_root(str(tmp_path / "nowhere"))
  with pytest.raises(p3.P3DataError, match="absent_subset: P3 subset directory not found"):
    p3.load_split(str(tmp_path / "absent_subset"), "train")
  write_subset(str(tmp_path), "s", "train", TRAIN_FEATURES, make_examples(2), shards=1)
  with pytest.raises(p3.P3DataError, match="info.validation.json: info file not found"):
    p3.load_split(str(tmp_path / "s"), "validation")


def test_registration_reads_no_data(tmp_path, monkeypatch):
  monkeypatch.setenv(p3.P3_DATA_DIR_ENV, str(tmp_path / "not_there_yet"))
  task = p3.register_p3_task("anything", task_name="test_p3_lazy")
  with pytest.raises(p3.P3DataError, match="not_there_yet: P3 data directory not found"):
    task.get_dataset(split="train")


def test_record_not_matching_its_info_file(tmp_path):
  features = dict(TRAIN_FEATURES)
  bad = make_examples(3)
  directory = write_subset(str(tmp_path), "s", "train", features, bad, shards=1)
  info = dict(features, targets={"dtype": "string", "shape": [None]})
  with open(os.path.join(directory, "info.train.json"), "w") as f:
    json.dump({"features": info}, f)
  with pytest.raises(p3.P3DataError, match=r"train.tfrecord-00000-of-00001: example 0: field 'targets' "
                                           r"is stored as int64_list; the info file says string"):
    p3.load_split(directory, "train")
  info = dict(features, extra={"dtype": "int32", "shape": [None]})
  with open(os.path.join(directory, "info.train.json"), "w") as f:
    json.dump({"features": info}, f)
  with pytest.raises(p3.P3DataError, match="example 0: field 'extra' is missing"):
    p3.load_split(directory, "train")
