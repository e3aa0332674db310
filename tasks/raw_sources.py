"""Raw (un-prompted) examples from the user's disk: local JSONL/CSV, TFDS, Hugging Face `datasets`.

Every reader returns a list of plain dicts (one per example, fields as stored), which the
template renderer turns into prompted inputs/targets. Nothing is downloaded: TFDS reads a
prepared `data_dir`, Hugging Face `datasets` a directory made by `save_to_disk`.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Optional

from elm_jax import jsonl
from elm_jax.errors import UserInputError


class RawDataError(UserInputError):
  """A raw data file or dataset that is missing or malformed."""


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """One JSON object per line; blank lines skipped."""
  try:
    return [row for _, row in jsonl.read_objects(path)]
  except jsonl.JsonlError as e:
    raise RawDataError(str(e)) from None


def read_json_list(path: str) -> list[dict[str, Any]]:
  """A JSON file holding a list of objects (or {"examples": [...]})."""
  if not os.path.isfile(path):
    raise RawDataError(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise RawDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  rows = data.get("examples") if isinstance(data, dict) else data
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise RawDataError(f"{path}: expected a list of objects, or an object with an 'examples' list")
  return rows


def read_csv(path: str, delimiter: str = ",") -> list[dict[str, Any]]:
  """A CSV file with a header row; every field is a string."""
  if not os.path.isfile(path):
    raise RawDataError(f"{path}: file not found")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    if not reader.fieldnames:
      raise RawDataError(f"{path}: expected a header row naming the columns")
    rows = []
    for number, row in enumerate(reader, start=2):
      if None in row or any(v is None for v in row.values()):
        raise RawDataError(f"{path}:{number}: expected {len(reader.fieldnames)} columns "
                           f"({', '.join(reader.fieldnames)})")
      rows.append(dict(row))
  return rows


def _to_python(value):
  import numpy as np
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_to_python(v) for v in value]
  return value


def read_tfds(name: str, split: str, data_dir: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
  """A prepared TFDS dataset (`name` like 'super_glue/cb:1.0.2') from `data_dir`; never downloads."""
  import tensorflow_datasets as tfds
  if not os.path.isdir(data_dir):
    raise RawDataError(f"{data_dir}: TFDS data_dir not found")
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
  except Exception as e:  # tfds raises assorted types (AssertionError, DatasetNotFoundError, ...)
    raise RawDataError(f"{data_dir}: cannot load TFDS dataset {name!r} split {split!r} without "
                       f"downloading ({type(e).__name__}: {e})") from None
  if limit is not None:
    ds = ds.take(limit)
  return [_to_python(ex) for ex in tfds.as_numpy(ds)]


def read_hf_saved(path: str, split: Optional[str] = None) -> list[dict[str, Any]]:
  """A Hugging Face `datasets` Dataset/DatasetDict written by `save_to_disk` (optional package)."""
  try:
    import datasets
  except ImportError:
    raise RawDataError(f"{path}: reading a Hugging Face dataset needs the optional package "
                       "'datasets' (pip install datasets)") from None
  if not os.path.isdir(path):
    raise RawDataError(f"{path}: directory not found")
  loaded = datasets.load_from_disk(path)
  if isinstance(loaded, datasets.DatasetDict):
    if split is None or split not in loaded:
      raise RawDataError(f"{path}: a DatasetDict; pass split=one of {sorted(loaded)}")
    loaded = loaded[split]
  return [dict(row) for row in loaded]


def read_raw(source: str, *, split: str = "train", data_dir: Optional[str] = None,
             limit: Optional[int] = None) -> list[dict[str, Any]]:
  """Dispatch: 'file.jsonl', 'file.csv', 'file.tsv', 'tfds:NAME' (needs data_dir), 'hf:DIR'."""
  if source.startswith("tfds:"):
    if not data_dir:
      raise RawDataError(f"{source}: a TFDS source needs data_dir (the prepared TFDS directory)")
    return read_tfds(source[len("tfds:"):], split, data_dir, limit)
  if source.startswith("hf:"):
    rows = read_hf_saved(source[len("hf:"):], split)
  elif source.endswith(".jsonl"):
    rows = read_jsonl(source)
  elif source.endswith(".json"):
    rows = read_json_list(source)
  elif source.endswith(".csv"):
    rows = read_csv(source)
  elif source.endswith(".tsv"):
    rows = read_csv(source, delimiter="\t")
  else:
    raise RawDataError(f"{source}: unknown source; expected a .jsonl/.csv/.tsv file, 'tfds:NAME' "
                       "or 'hf:DIR'")
  return rows[:limit] if limit is not None else rows
