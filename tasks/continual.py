"""Continual-learning generative tasks (the cT0 setting) from local JSON/JSONL files.

Each split is a file of objects; `inputs_field` and `targets_field` name the prompted source and
the target (default `source` / `target`; the cT0 JSON files' field names are not public, so pass
yours). A training split keeps at most its expert's cap of rows (100,000 for the cT0 experts;
wiki_auto every row, as the paper's task class takes it, unless `sampling_follows='configs'`):
the first of `torch.randperm(rows, generator seed 42)` over the file, as the paper's code draws
`max_train_samples` (`mixtures.budget_rows`), kept in file order (the trainer reads them in a new
permutation every epoch: `tasks.row_order`). An evaluation split keeps at most 300
examples, `random.Random(42).sample` of the file: the paper's `target_eval_300.json` holds at
most 300 examples per prompt chosen at random with seed 42; which 300 it chose is not public.
"""

from __future__ import annotations

import os
import random
from typing import Mapping, Optional

from tasks import inventory, mixtures, prompted, raw_sources

EVAL_EXAMPLES = 300
EVAL_SEED = 42
TRAIN_SEED = 42


def continual_rows(path: str, inputs_field: str = "source", targets_field: str = "target",
                   limit: Optional[int] = None, seed: Optional[int] = None) -> list[dict[str, str]]:
  """{inputs, targets} rows from a JSON/JSONL file; a missing field names the file and example.
  With `limit`, at most `limit` rows: `random.Random(seed).sample` of them (evaluation's cut)."""
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


def train_rows(rows: list, sample: inventory.TrainSample, seed: int = TRAIN_SEED) -> list:
  """The rows of a training file an expert trains on (`inventory.TrainSample`), in file order."""
  keep = mixtures.budget_rows(len(rows), sample.samples, sample.sampling, seed, sample.drawn_from)
  return rows if keep is None else [row for row, k in zip(rows, keep) if k]


def register_continual_task(name: str, split_files: Mapping[str, str], vocabulary, *,
                            inputs_field: str = "source", targets_field: str = "target",
                            train_sample: Optional[inventory.TrainSample] = None) -> str:
  """Registers a text-to-text task `name` whose splits come from `split_files` ({split: path});
  the train split is cut to `train_sample` (None: every row), the others to 300 examples
  (seed 42)."""
  def rows_fn(split: str):
    if split not in split_files:
      raise raw_sources.RawDataError(f"task {name!r}: no file for split {split!r} "
                                     f"(have {sorted(split_files)})")
    if split == "train":
      rows = continual_rows(split_files[split], inputs_field, targets_field)
      return rows if train_sample is None else train_rows(rows, train_sample)
    return continual_rows(split_files[split], inputs_field, targets_field, EVAL_EXAMPLES, EVAL_SEED)

  prompted.register_prompted_task(name, rows_fn, vocabulary, splits=tuple(split_files),
                                  score_eval=False, source=name)
  return name


# ---------------------------------------------------------------------------- the cT0 experts
CONTINUAL_DATA_DIR_ENV = "ELM_CONTINUAL_DATA_DIR"
CONTINUAL_MIXTURE = inventory.CONTINUAL_MIXTURE
CONTINUAL_EVAL_MIXTURE = inventory.CONTINUAL_EVAL_MIXTURE
CONTINUAL_EXPERTS = inventory.CONTINUAL_EXPERTS
CONTINUAL_EVAL = inventory.CONTINUAL_EVAL
# The continual experts whose task class ignores the cap (ELM_NOTES §1.5, correction).
CODE_WHOLE_SPLIT = {"wiki_auto"}


def expert_sample(expert: inventory.ContinualExpert, sampling_follows: str = "code") -> inventory.TrainSample:
  """The rows a continual expert trains on: at most its cap (100,000), the first of a seed-42
  permutation. The paper's wiki_auto task class takes its whole train split whatever the cap
  (elm_reference.json `official_code_whole_slice`), so with sampling_follows='code' (default)
  wiki_auto's expert trains on every row; 'configs' caps it too."""
  inventory.train_sample(expert.dataset, None, sampling_follows)  # checks the value
  if sampling_follows == "code" and expert.dataset in CODE_WHOLE_SPLIT:
    return inventory.TrainSample(None, "all")
  return inventory.TrainSample(expert.max_samples, "permutation")


def data_root(data_dir: Optional[str] = None) -> Optional[str]:
  return data_dir or os.environ.get(CONTINUAL_DATA_DIR_ENV) or None


def train_file(expert_name: str, data_dir: Optional[str] = None) -> Optional[str]:
  root = data_root(data_dir)
  return None if not root else os.path.join(root, expert_name, "train.jsonl")


def train_split_rows(expert_name: str, data_dir: Optional[str] = None) -> Optional[int]:
  """Rows of a continual expert's training file (before its cap), or None when the file is not
  on this machine."""
  path = train_file(expert_name, data_dir)
  if path is None or not os.path.isfile(path):
    return None
  with open(path, "rb") as f:  # one object per non-blank line, as read_raw reads it
    return sum(1 for line in f if line.strip())


def known_train_rows(data_dir: Optional[str] = None) -> dict[str, int]:
  """{expert name: training rows} for the continual experts whose files are on this machine."""
  sizes = {e.name: train_split_rows(e.name, data_dir) for e in CONTINUAL_EXPERTS}
  return {name: n for name, n in sizes.items() if n is not None}


def register_continual_experts(data_dir: Optional[str] = None, vocabulary=None,
                               sampling_follows: str = "code") -> list[str]:
  """Registers the 10 continual experts' tasks (and the mixture `continual_10`), and the paper's
  16 continual evaluation prompts (each its own task `ct0_eval_*`, mixture `continual_eval_16`),
  from local copies of their data: `<data_dir or $ELM_CONTINUAL_DATA_DIR>/<expert name>/
  {train,validation}.jsonl` (the 10 experts' prompts; their evaluation reads the expert's
  validation file) and `<root>/<evaluation prompt name>/validation.jsonl` for the other 6
  (wiki_auto simplification_2, asset simplification_1/2, gigaword's 3 write_its_sentence), with
  `source` / `target` fields (the cT0 JSON files, converted). Each expert's training rows are
  `expert_sample`'s. Nothing is read until a dataset is asked for; a missing directory is named
  then."""
  root = data_root(data_dir)
  if vocabulary is None and os.environ.get(mixtures.T5_VOCAB_ENV):
    vocabulary = mixtures.t5_vocabulary()
  missing = lambda what: (f"{what}: set ${CONTINUAL_DATA_DIR_ENV} (holding {what}/train.jsonl and "  # noqa: E731
                          f"validation.jsonl) and ${mixtures.T5_VOCAB_ENV}")
  names = []
  for expert in CONTINUAL_EXPERTS:
    if not root or vocabulary is None:
      # Registered anyway (a dry run needs no data); reading it says what to set.
      mixtures.unavailable_task(expert.name, missing(expert.name))
    else:
      directory = os.path.join(root, expert.name)
      files = {split: os.path.join(directory, f"{split}.jsonl") for split in ("train", "validation")}
      register_continual_task(expert.name, files, vocabulary,
                              train_sample=expert_sample(expert, sampling_follows))
    names.append(expert.name)
  mixtures.add_mixture(CONTINUAL_MIXTURE, names)
  evals = []
  for prompt in CONTINUAL_EVAL:
    directory = prompt.expert or prompt.name
    if not root or vocabulary is None:
      mixtures.unavailable_task(prompt.name, missing(directory))
    else:
      register_continual_task(prompt.name, {"validation": os.path.join(root, directory, "validation.jsonl")},
                              vocabulary)
    evals.append(prompt.name)
  mixtures.add_mixture(CONTINUAL_EVAL_MIXTURE, evals)
  return names
