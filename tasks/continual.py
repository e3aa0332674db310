"""Continual-learning generative tasks (the cT0 setting) from local JSON/JSONL files.

Each split is a file of objects; `inputs_field` and `targets_field` name the prompted source and
the target (default `source` / `target`; the cT0 JSON files' field names are not public, so pass
yours). Evaluation keeps at most 300 examples per task, chosen with seed 42, as the paper does.
"""

from __future__ import annotations

import os
import random
from typing import Mapping, Optional

from tasks import inventory, mixtures, prompted, raw_sources

EVAL_EXAMPLES = 300
EVAL_SEED = 42


def continual_rows(path: str, inputs_field: str = "source", targets_field: str = "target",
                   limit: Optional[int] = None, seed: Optional[int] = None) -> list[dict[str, str]]:
  """{inputs, targets} rows from a JSON/JSONL file; a missing field names the file and example."""
  rows = []
  for i, row in enumerate(raw_sources.read_raw(path)):
    for field in (inputs_field, targets_field):
      if not isinstance(row.get(field), str):
        raise raw_sources.RawDataError(
            f"{path}: example {i}: field {field!r} must be a string (got {type(row.get(field)).__name__})")
    rows.append({"inputs": row[inputs_field], "targets": row[targets_field]})
  if limit is not None and len(rows) > limit:
    rows = random.Random(seed).sample(rows, limit)
  return rows


def register_continual_task(name: str, split_files: Mapping[str, str], vocabulary, *,
                            inputs_field: str = "source", targets_field: str = "target") -> str:
  """Registers a text-to-text task `name` whose splits come from `split_files` ({split: path});
  non-train splits are cut to 300 examples (seed 42)."""
  def rows_fn(split: str):
    if split not in split_files:
      raise raw_sources.RawDataError(f"task {name!r}: no file for split {split!r} "
                                     f"(have {sorted(split_files)})")
    limit = None if split == "train" else EVAL_EXAMPLES
    return continual_rows(split_files[split], inputs_field, targets_field, limit, EVAL_SEED)

  prompted.register_prompted_task(name, rows_fn, vocabulary, splits=tuple(split_files),
                                  score_eval=False, source=name)
  return name


# ---------------------------------------------------------------------------- the cT0 experts
CONTINUAL_DATA_DIR_ENV = "ELM_CONTINUAL_DATA_DIR"
CONTINUAL_MIXTURE = inventory.CONTINUAL_MIXTURE
CONTINUAL_EXPERTS = inventory.CONTINUAL_EXPERTS


def register_continual_experts(data_dir: Optional[str] = None, vocabulary=None) -> list[str]:
  """Registers the 10 continual experts' tasks (and the mixture `continual_10`) from local copies
  of their data: `<data_dir or $ELM_CONTINUAL_DATA_DIR>/<expert name>/{train,validation}.jsonl`
  with `source` / `target` fields (the cT0 JSON files, converted). Nothing is read until a
  dataset is asked for; a missing directory is named then."""
  root = data_dir or os.environ.get(CONTINUAL_DATA_DIR_ENV)
  if vocabulary is None and os.environ.get(mixtures.T5_VOCAB_ENV):
    vocabulary = mixtures.t5_vocabulary()
  names = []
  for expert in CONTINUAL_EXPERTS:
    if not root or vocabulary is None:
      # Registered anyway (a dry run needs no data); reading it says what to set.
      mixtures.unavailable_task(expert.name, f"{expert.name}: set ${CONTINUAL_DATA_DIR_ENV} (holding "
                                f"{expert.name}/train.jsonl and validation.jsonl) and ${mixtures.T5_VOCAB_ENV}")
    else:
      directory = os.path.join(root, expert.name)
      files = {split: os.path.join(directory, f"{split}.jsonl") for split in ("train", "validation")}
      register_continual_task(expert.name, files, vocabulary)
    names.append(expert.name)
  mixtures.add_mixture(CONTINUAL_MIXTURE, names)
  return names
