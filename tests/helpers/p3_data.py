"""P3 as published, in miniature: TFRecord shards and info.<split>.json files for a subset."""

import contextlib
import json
import os

import numpy as np
import seqio
import tensorflow as tf

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


def write_stats(root, subset, examples):
  """A P3 subset known by its size only: info.train.json and stats.train.json saying `examples`
  rows (what plans read without touching a record)."""
  directory = os.path.join(root, subset)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "info.train.json"), "w") as f:
    json.dump({"features": TRAIN_FEATURES, "num_shards": 1, "seqio_version": "0.0.6"}, f)
  with open(os.path.join(directory, "stats.train.json"), "w") as f:
    json.dump({"examples": examples}, f)
  return directory


def write_continual(root, expert, rows, split="train"):
  """`<root>/<expert>/<split>.jsonl` with `rows` {source, target} rows (row i: 'source i')."""
  directory = os.path.join(root, expert)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
    f.write("".join(f'{{"source": "source {i}", "target": "target {i}"}}\n' for i in range(rows)))
  return directory


@contextlib.contextmanager
def separate_registry():
  """seqio's task and mixture registries emptied for the block and restored afterwards, so a
  module that registers the ELM tasks over its own P3 fixture neither meets the registrations
  other tests left behind (the same names over no data, say) nor leaves its own."""
  registries = (seqio.TaskRegistry._REGISTRY, seqio.MixtureRegistry._REGISTRY)
  saved = [dict(r) for r in registries]
  for registry in registries:
    registry.clear()
  try:
    yield
  finally:
    for registry, old in zip(registries, saved):
      registry.clear()
      registry.update(old)

