"""Prompted instances of a SeqIO task, and the retrieval text formats of the paper's code.

An instance is {"inputs": prompted source text, "answer_choices": [str] or None, "label": int or
None, "targets": str or None}. They are read from a task's source before tokenization:
- a rank-classification task (rows carry `idx`, as `<task>_score_eval` and P3's score-eval
  subsets do) is regrouped into one instance per example with its choices;
- a text-to-text task gives `inputs` / `targets` (or P3's `*_pretokenized` fields) and its
  `answer_choices` field when it has one; its `<task>_score_eval` twin is preferred when
  registered, because it carries the choices;
- a mixture gives instances from each member in turn.

Text formats (`retrieval/make_index.py` of the paper's code): `instance` "Instance: {src}";
`label` "Answer Choices: {a, b}"; `label_instance` (the paper's main setting) "Answer Choices:
{a, b}, Instance: {src}"; `choice` and `choice_instance` use the template's raw answer-choices
string when the instance has one (`choice_template`), else the joined choices.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError
from tasks.builtin_registry import register_builtin_suite
from tasks.mixtures import register_elm_tasks

TEXT_FORMATS = ("instance", "label", "label_instance", "choice", "choice_instance")
DEFAULT_TEXT_FORMAT = "label_instance"
NUM_KEYS = 100          # training instances stored per expert (seen_target_train_100.json)
NUM_QUERIES = 32        # unlabeled inputs of the target task (the first 32, in file order)
KEY_SEED = 42
MAX_SCAN = 20_000       # the key sample is drawn from at most this many rows of a split
_READ_BATCH = 1024


class InstanceError(UserInputError):
  """A task that cannot give instances (unregistered, no such split, unreadable fields)."""


def format_text(instance: dict[str, Any], text_format: str = DEFAULT_TEXT_FORMAT) -> str:
  """The retrieval text of an instance in one of TEXT_FORMATS."""
  if text_format not in TEXT_FORMATS:
    raise InstanceError(f"text_format: expected one of {TEXT_FORMATS}, got {text_format!r}")
  labels = ", ".join(instance.get("answer_choices") or [])
  if text_format.startswith("choice"):
    labels = instance.get("choice_template") or labels
  if text_format == "instance":
    return f"Instance: {instance['inputs']}"
  if text_format in ("label", "choice"):
    return f"Answer Choices: {labels}"
  return f"Answer Choices: {labels}, Instance: {instance['inputs']}"


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def _source_rows(task, split: str, limit: Optional[int]) -> list[dict[str, Any]]:
  tf_input.tensorflow()
  if split not in task.source.splits:
    raise InstanceError(f"task {task.name!r}: no split {split!r}; it has {list(task.source.splits)}")
  dataset = task.source.get_dataset(split=split, shuffle=False)
  if limit is not None:
    dataset = dataset.take(limit)
  tf = tf_input.tensorflow()
  specs = tf.nest.flatten(dataset.element_spec)
  if not isinstance(dataset.element_spec, dict) or not all(
      isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in specs):
    return list(dataset.as_numpy_iterator())
  # Fixed-shape features: read in batches (per-element iteration costs ~0.4 ms a row).
  rows = []
  for batch in dataset.batch(_READ_BATCH).as_numpy_iterator():
    size = len(next(iter(batch.values())))
    rows.extend({k: v[i] for k, v in batch.items()} for i in range(size))
  return rows


def _from_rank_rows(rows: list[dict[str, Any]], task_name: str) -> list[dict[str, Any]]:
  examples: dict[int, dict[str, Any]] = {}
  for row in rows:
    example, choice = (int(v) for v in np.asarray(row["idx"]).reshape(-1)[:2])
    inputs = _text(row.get("inputs_pretokenized", row.get("inputs")))
    target = _text(row.get("targets_pretokenized", row.get("targets"))).strip()
    entry = examples.setdefault(example, {"inputs": inputs, "choices": {}, "label": None})
    entry["choices"][choice] = target
    if bool(row.get("is_correct", False)):
      entry["label"] = choice
  out = []
  for example in sorted(examples):
    entry = examples[example]
    choices = [entry["choices"][c] for c in sorted(entry["choices"])]
    label = entry["label"]
    out.append({"inputs": entry["inputs"], "answer_choices": choices, "label": label,
                "targets": choices[label] if label is not None else None})
  if not out:
    raise InstanceError(f"task {task_name!r}: no rows")
  return out


def _from_text_rows(rows: list[dict[str, Any]], task_name: str) -> list[dict[str, Any]]:
  out = []
  for i, row in enumerate(rows):
    key = "inputs_pretokenized" if "inputs_pretokenized" in row else "inputs"
    if key not in row or not isinstance(row[key], (bytes, str)):
      raise InstanceError(f"task {task_name!r}: row {i} has no text field 'inputs' or "
                          "'inputs_pretokenized' in its source")
    choices = row.get("answer_choices")
    choices = [_text(c) for c in choices] if choices is not None and len(choices) else None
    target_key = "targets_pretokenized" if "targets_pretokenized" in row else "targets"
    target = _text(row[target_key]).strip() if target_key in row else None
    label = choices.index(target) if choices and target in choices else None
    out.append({"inputs": _text(row[key]), "answer_choices": choices, "label": label, "targets": target})
  return out


def task_instances(name: str, split: str, limit: Optional[int]) -> list[dict[str, Any]]:
  """Up to `limit` instances (None: all) of a registered task or mixture, in source order."""
  if name in seqio.MixtureRegistry.names():
    members = [t.name for t in seqio.MixtureRegistry.get(name).tasks]
    per_member = [task_instances(m, split, limit) for m in members]
    out = []
    for row in range(max((len(r) for r in per_member), default=0) if limit is None else limit):
      out.extend(rows[row] for rows in per_member if row < len(rows))
    return out[:limit]
  if name not in seqio.TaskRegistry.names():
    raise InstanceError(f"task {name!r} is not registered; register it (e.g. --setup=builtin or "
                        "--setup=module:function) or list the registered ones with `elm-jax tasks`")
  eval_twin = f"{name}_score_eval"
  task = seqio.TaskRegistry.get(eval_twin if eval_twin in seqio.TaskRegistry.names() else name)
  # Rank rows (one per choice) are expected from score-eval tasks: read enough for `limit` examples.
  expect_rank = task.name.endswith("_score_eval")
  rows = _source_rows(task, split, None if limit is None else (limit * 64 if expect_rank else limit))
  if rows and "idx" in rows[0]:
    return _from_rank_rows(rows, task.name)[:limit]
  return _from_text_rows(rows[:limit], task.name)


def training_keys(task: str, num_keys: int = NUM_KEYS, seed: int = KEY_SEED,
                  split: str = "train") -> list[dict[str, Any]]:
  """The expert's retrieval keys: `num_keys` instances drawn without replacement with `seed`
  from (the first MAX_SCAN rows of) the task's training split, as the paper's randperm(seed 42)."""
  rows = task_instances(task, split, MAX_SCAN)
  order = np.random.default_rng(seed).permutation(len(rows))[:num_keys]
  return [rows[i] for i in sorted(order)]


def query_instances(task: str, num_queries: int = NUM_QUERIES, split: str = "validation",
                    labelled: bool = False) -> list[dict[str, Any]]:
  """The first `num_queries` instances of the target task, labels dropped unless `labelled`."""
  rows = task_instances(task, split, num_queries)
  if not labelled:
    rows = [{**r, "label": None, "targets": None} for r in rows]
  return rows


def strip_labels(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{k: v for k, v in r.items() if k not in ("label", "targets")} for r in rows]


def register_setup(setup: Optional[str]) -> None:
  """Registers tasks before they are looked up: 'builtin' (the built-in suite), 'elm' (the
  paper's P3 tasks, from $ELM_P3_DATA_DIR), or 'package.module:function' (called with no
  arguments). Built-in task names are registered on demand anyway."""
  if not setup:
    return
  for item in setup.split(","):
    if item == "builtin":
      register_builtin_suite()
    elif item == "elm":
      register_elm_tasks()
    elif ":" in item:
      module, function = item.split(":", 1)
      try:
        getattr(importlib.import_module(module), function)()
      except (ImportError, AttributeError) as e:
        raise InstanceError(f"--setup={item}: cannot call {module}.{function} ({e})") from None
    else:
      raise InstanceError(f"--setup: expected 'builtin', 'elm' or 'module:function', got {item!r}")


def ensure_registered(names) -> None:
  """Registers the built-in suite when any of `names` is one of its tasks or mixtures."""
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if any(n.startswith("builtin_") and n not in known for n in names):
    register_setup("builtin")
