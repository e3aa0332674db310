"""SeqIO tasks over a local copy of P3 (bigscience/P3), read as published.

P3 is a SeqIO cache: one directory per subset (`<root>/<subset>/`) holding TFRecord shards of
`tf.train.Example` per split (`train.tfrecord-00000-of-00001`) and `info.<split>.json` files
listing each feature's dtype and shape, e.g. `{"features": {"inputs": {"dtype": "int32",
"shape": [null]}, ...}}`. The info files are read, not assumed. Registration reads nothing: the
info file and the shards are opened when a dataset is first requested.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Iterable, Optional

import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError

P3_DATA_DIR_ENV = "ELM_P3_DATA_DIR"
SPLITS = ("train", "validation", "test")
_DTYPES = {"int32", "int64", "float32", "string", "bool"}
VALIDATE_RECORDS_PER_SHARD = 16


class P3DataError(UserInputError):
  """A missing P3 root/subset/split, or a TFRecord that does not match its info file."""


def p3_data_root(data_dir: Optional[str] = None) -> str:
  """The P3 root: `data_dir` if given, else $ELM_P3_DATA_DIR."""
  root = data_dir or os.environ.get(P3_DATA_DIR_ENV)
  if not root:
    raise P3DataError(f"no P3 data directory: pass data_dir or set ${P3_DATA_DIR_ENV} to the "
                      "directory holding one sub-directory per P3 subset")
  if not os.path.isdir(root):
    raise P3DataError(f"{root}: P3 data directory not found (from data_dir or ${P3_DATA_DIR_ENV})")
  return root


def read_info(subset_dir: str, split: str) -> dict[str, dict[str, Any]]:
  """{feature: {"dtype", "shape"}} from `info.<split>.json`, validated."""
  path = os.path.join(subset_dir, f"info.{split}.json")
  if not os.path.isfile(path):
    raise P3DataError(f"{path}: info file not found (split {split!r} of this subset)")
  try:
    with open(path) as f:
      features = json.load(f)["features"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise P3DataError(f"{path}: expected a JSON object with a 'features' mapping ({e})") from None
  for name, spec in features.items():
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
      raise P3DataError(f"{path}: feature {name!r}: expected {{'dtype': one of {sorted(_DTYPES)}, "
                        f"'shape': [...]}}, got {spec!r}")
  return features


def shard_files(subset_dir: str, split: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(subset_dir, f"{split}.tfrecord*")))
  if not files:
    raise P3DataError(f"{subset_dir}: no TFRecord files for split {split!r} "
                      f"(looked for {split}.tfrecord-*)")
  return files


def _parse_spec(features: dict[str, dict[str, Any]]):
  tf = tf_input.tensorflow()
  stored = {"int32": tf.int64, "int64": tf.int64, "bool": tf.int64, "float32": tf.float32,
            "string": tf.string}
  spec = {}
  for name, info in features.items():
    shape, dtype = info["shape"], stored[info["dtype"]]
    if None in shape:
      spec[name] = tf.io.FixedLenSequenceFeature([], dtype, allow_missing=True)
    else:
      spec[name] = tf.io.FixedLenFeature(shape, dtype)
  return spec


def validate_shard(path: str, features: dict[str, dict[str, Any]],
                   max_records: int = VALIDATE_RECORDS_PER_SHARD) -> None:
  """Checks the first records of a shard against the info file's features (kind and length)."""
  tf = tf_input.tensorflow()
  kinds = {"int32": "int64_list", "int64": "int64_list", "bool": "int64_list",
           "float32": "float_list", "string": "bytes_list"}
  for index, raw in enumerate(tf.data.TFRecordDataset(path).take(max_records).as_numpy_iterator()):
    example = tf.train.Example.FromString(raw)
    present = example.features.feature
    for name, info in features.items():
      where = f"{path}: example {index}: field {name!r}"
      if name not in present:
        raise P3DataError(f"{where} is missing (the info file lists it)")
      kind = present[name].WhichOneof("kind")
      if kind != kinds[info["dtype"]]:
        raise P3DataError(f"{where} is stored as {kind}; the info file says {info['dtype']}")
      length = len(getattr(present[name], kind).value)
      if None not in info["shape"] and length != math.prod(info["shape"]):
        raise P3DataError(f"{where} has {length} values; the info file says shape {info['shape']}")
    extra = sorted(set(present) - set(features))
    if extra:
      raise P3DataError(f"{path}: example {index}: field(s) {extra} are not in the info file")


def record_parser(subset_dir: str, split: str):
  """The function that turns one serialized record of the split into a dict of tensors, with
  dtypes and shapes as the info file says (the shards' first records checked against it)."""
  tf = tf_input.tensorflow()
  features = read_info(subset_dir, split)
  for path in shard_files(subset_dir, split):
    validate_shard(path, features)
  spec = _parse_spec(features)
  casts = {name: {"int32": tf.int32, "bool": tf.bool}.get(info["dtype"]) for name, info in features.items()}

  def parse(raw):
    example = tf.io.parse_single_example(raw, spec)
    return {k: tf.cast(v, casts[k]) if casts[k] is not None else v for k, v in example.items()}
  return parse


def load_split(subset_dir: str, split: str, shuffle_files: bool = False, seed: Optional[int] = None):
  """tf.data.Dataset of parsed examples, with dtypes and shapes as the info file says."""
  tf = tf_input.tensorflow()
  if not os.path.isdir(subset_dir):
    raise P3DataError(f"{subset_dir}: P3 subset directory not found")
  parse = record_parser(subset_dir, split)
  files_ds = tf.data.Dataset.from_tensor_slices(shard_files(subset_dir, split))
  if shuffle_files:
    files_ds = files_ds.shuffle(len(shard_files(subset_dir, split)), seed=seed)
  return files_ds.interleave(tf.data.TFRecordDataset, cycle_length=1).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)


class RecordIndex:
  """Random access to the records of a split's TFRecord shards, in file order: record i of the
  split is `read(i)` (serialized bytes). Built by walking each shard's record headers (a length
  and a checksum before each record, a checksum after it), so no record is parsed or held; a
  shard whose headers do not end exactly at its end (a compressed or damaged file) is refused."""

  def __init__(self, subset_dir: str, split: str):
    if not os.path.isdir(subset_dir):
      raise P3DataError(f"{subset_dir}: P3 subset directory not found")
    self.files = shard_files(subset_dir, split)
    starts, lengths, shard = [], [], []
    for k, path in enumerate(self.files):
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        offset = 0
        while offset < size:
          header = f.read(12)
          if len(header) < 12:
            raise P3DataError(f"{path}: record header at byte {offset} is cut short; expected an "
                              "uncompressed TFRecord file")
          length = int.from_bytes(header[:8], "little")
          end = offset + 12 + length + 4
          if end > size:
            raise P3DataError(f"{path}: record at byte {offset} claims {length} bytes, past the end "
                              f"of the file ({size} bytes); expected an uncompressed TFRecord file")
          starts.append(offset + 12)
          lengths.append(length)
          shard.append(k)
          f.seek(end)
          offset = end
    self.starts = np.asarray(starts, np.int64)
    self.lengths = np.asarray(lengths, np.int64)
    self.shard = np.asarray(shard, np.int32)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return len(self.starts)

  def read(self, i: int) -> bytes:
    k = int(self.shard[i])
    fd = self._fds.get(k)
    if fd is None:
      fd = self._fds.setdefault(k, os.open(self.files[k], os.O_RDONLY))
    return os.pread(fd, int(self.lengths[i]), int(self.starts[i]))

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()


class P3Source(seqio.FunctionDataSource):
  """The data source of a P3 subset: a SeqIO source that also knows its directory, so that the
  trainer (`tasks.row_order`) can read its records by index."""

  def __init__(self, subset: str, data_dir: Optional[str]):
    self.subset, self.data_dir = subset, data_dir

    def dataset_fn(split, shuffle_files, seed=None):
      return load_split(self.subset_dir(), split, shuffle_files, seed)
    super().__init__(dataset_fn, splits=SPLITS)

  def subset_dir(self) -> str:
    return os.path.join(p3_data_root(self.data_dir), self.subset)


def register_p3_task(subset: str, data_dir: Optional[str] = None, *, vocabulary=None,
                     task_name: Optional[str] = None, postprocess_fn=None, metric_fns=()):
  """Registers SeqIO task `task_name` (default: the P3 subset name) reading `<root>/<subset>`.

  Nothing is read now; the root is resolved (from `data_dir` or $ELM_P3_DATA_DIR) when a dataset
  is requested. P3 is pre-tokenized with T5's vocabulary: pass that vocabulary
  (`seqio.SentencePieceVocabulary`) to decode; by default a pass-through one is used.
  """

  name = task_name or subset
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)

  def dataset_fn(split, shuffle_files, seed=None):
    return load_split(os.path.join(p3_data_root(data_dir), subset), split, shuffle_files, seed)

  vocabulary = vocabulary or seqio.PassThroughVocabulary(size=32128, eos_id=1)
  output_features = {
      "inputs": seqio.Feature(vocabulary, add_eos=False, dtype="int32"),
      "targets": seqio.Feature(vocabulary, add_eos=False, dtype="int32"),
  }
  return seqio.TaskRegistry.add(
      name, source=P3Source(subset, data_dir),
      output_features=output_features, preprocessors=[], postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns))


def register_p3_tasks(subsets: Iterable[str], data_dir: Optional[str] = None, vocabulary=None) -> list[str]:
  return [register_p3_task(s, data_dir, vocabulary=vocabulary).name for s in subsets]
