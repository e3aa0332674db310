"""P3 as published: tiny TFRecord shards + info.<split>.json files made here, read through a
registered SeqIO task into the batches the T5 consumes (EncDecFeatureConverter, packed and not)."""

import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from tasks import p3

TRAIN_FEATURES = {
    "inputs": {"dtype": "int32", "shape": [None]},
    "inputs_pretokenized": {"dtype": "string", "shape": []},
    "targets": {"dtype": "int32", "shape": [None]},
    "targets_pretokenized": {"dtype": "string", "shape": []},
    "answer_choices": {"dtype": "string", "shape": [None]},
}
SCORE_FEATURES = {**TRAIN_FEATURES, "idx": {"dtype": "int32", "shape": [2]},
                  "is_correct": {"dtype": "bool", "shape": []},
                  "weight": {"dtype": "float32", "shape": []}}


def _feature(value, dtype):
  values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
  if dtype == "string":
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
  if dtype == "float32":
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def write_subset(root, subset, split, features, examples, shards=2):
  directory = os.path.join(root, subset)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"info.{split}.json"), "w") as f:
    json.dump({"features": features, "num_shards": shards, "seqio_version": "0.0.6"}, f)
  for s in range(shards):
    path = os.path.join(directory, f"{split}.tfrecord-{s:05d}-of-{shards:05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for ex in examples[s::shards]:
        feats = {k: _feature(v, features[k]["dtype"]) for k, v in ex.items()}
        writer.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
  return directory


def make_examples(n, score=False):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    ex = {"inputs": list(rng.integers(3, 100, rng.integers(3, 9))) + [1],
          "inputs_pretokenized": f"question {i}", "targets": [int(5 + i % 2), 1],
          "targets_pretokenized": ["yes", "no"][i % 2], "answer_choices": ["yes", "no"]}
    if score:
      ex.update(idx=[i // 2, i % 2], is_correct=i % 2 == 0, weight=1.0)
    out.append(ex)
  return out


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
