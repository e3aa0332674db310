"""Prompted instances of a SeqIO task, and the retrieval text formats of the paper's code.

An instance is {"inputs": prompted source text, "answer_choices": [str] or None, "label": int or
None, "targets": str or None}. They are read from a task's source before tokenization:
- a rank-classification task (rows carry `idx`, as `<task>_score_eval` and P3's score-eval
  subsets do) is regrouped into one instance per example with its choices;
- a text-to-text task gives `inputs` / `targets` (or P3's `*_pretokenized` fields) and its
  `answer_choices` field when it has one; its `<task>_score_eval` twin is preferred when
  registered, because it carries the choices;
- a mixture gives instances from each member in turn.

Which instances (the paper's `seq2seq/extract_data_subset_*.py` and `retrieval/run_retrieval.py`):
- an expert's retrieval keys (`training_keys`) are the first 100 of `torch.randperm(n, generator
  seed 42)` over the n rows of its split as the paper's task class loads it: the whole train split,
  or the class's first-N slice (`key_source`: wiki_hop, amazon_polarity, yelp_review_full,
  dbpedia_14, imdb and app_reviews 50,000 rows; gigaword and multi_news 10,000); a continual
  expert's keys come from its validation split (the paper's `target_train` script loads
  'validation'), the first 300 rows where its class loads 300;
- a target task's queries (`query_instances`) are the first 32 of the same draw over its
  validation split: the paper's `unseen_eval_300.json` (not public) holds the first 300 of that
  draw in draw order, as its public siblings `seen_eval_300.json` / `target_eval_300.json` do,
  and `run_retrieval.py` takes the first 32 entries of each prompt.
`randperm.torch_randperm` reproduces PyTorch's CPU randperm without PyTorch (tested against a
golden file made by `tools/make_randperm_golden.py`). Instances keep the draw's order; row i is the split's
i-th row as SeqIO reads it (P3's file order), the i-th example for rank-classification rows.

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
from tasks import inventory
from tasks.builtin_registry import register_builtin_suite
from tasks.mixtures import register_elm_tasks
from tasks.randperm import TORCH_RANDPERM_BRANCH_N, torch_randperm  # noqa: F401  (re-exported)

TEXT_FORMATS = ("instance", "label", "label_instance", "choice", "choice_instance")
DEFAULT_TEXT_FORMAT = "label_instance"
NUM_KEYS = 100          # training instances stored per expert (seen_target_train_100.json)
NUM_QUERIES = 32        # unlabeled inputs of the target task (the first 32 of its seed-42 draw)
KEY_SEED = 42           # the paper's torch.Generator().manual_seed(42)
# A continual expert's keys: the split its class loads for them and how many leading rows
# (`seq2seq/data/tasks.py`: the cT0 classes keep the first 300 test rows, except gigaword's
# constraint files and haiku; covid_qa's validation split is its train file).
_CONTINUAL_KEY_SOURCE = {"wiki_auto": ("validation", 300), "gigaword": ("validation", None),
                         "haiku": ("validation", None), "covid_qa": ("train", None),
                         "eli5": ("validation", 300), "empathetic_dialogues": ("validation", 300),
                         "esnli": ("validation", 300), "twitter_top20": ("validation", 300)}
_ELM_PREFIXES = ("elm_pe_", "elm_de_", "elm_fde_")
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
  dataset = _split_dataset(task, split, limit)
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


def _rank_instances_by_id(rows: list[dict[str, Any]], task_name: str) -> dict[int, dict[str, Any]]:
  """{example id: instance} from rank-classification rows (one row per (example, choice))."""
  examples: dict[int, dict[str, Any]] = {}
  for row in rows:
    example, choice = (int(v) for v in np.asarray(row["idx"]).reshape(-1)[:2])
    inputs = _text(row.get("inputs_pretokenized", row.get("inputs")))
    target = _text(row.get("targets_pretokenized", row.get("targets"))).strip()
    entry = examples.setdefault(example, {"inputs": inputs, "choices": {}, "label": None})
    entry["choices"][choice] = target
    if bool(row.get("is_correct", False)):
      entry["label"] = choice
  out = {}
  for example, entry in examples.items():
    choices = [entry["choices"][c] for c in sorted(entry["choices"])]
    label = entry["label"]
    out[example] = {"inputs": entry["inputs"], "answer_choices": choices, "label": label,
                    "targets": choices[label] if label is not None else None}
  return out


def _from_rank_rows(rows: list[dict[str, Any]], task_name: str) -> list[dict[str, Any]]:
  by_id = _rank_instances_by_id(rows, task_name)
  if not by_id:
    raise InstanceError(f"task {task_name!r}: no rows")
  return [by_id[example] for example in sorted(by_id)]


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
  task = _instance_task(name)
  # Rank rows (one per choice) are expected from score-eval tasks: read enough for `limit` examples.
  expect_rank = task.name.endswith("_score_eval")
  rows = _source_rows(task, split, None if limit is None else (limit * 64 if expect_rank else limit))
  if rows and "idx" in rows[0]:
    return _from_rank_rows(rows, task.name)[:limit]
  return _from_text_rows(rows[:limit], task.name)


def key_source(task: str, split: str = "train") -> tuple[str, str, Optional[int]]:
  """(task to read, split, leading rows: None for all) of the population an expert's retrieval
  keys are drawn from, as the paper's task class loads it: an ELM prompt-expert task
  (`elm_pe_`, `elm_de_`, `elm_fde_` + the prompt's P3 name) reads its prompt's whole train split
  (registered under that name), cut to the class's slice (`inventory.WHOLE_SLICE`,
  `inventory.SLICE_THEN_DRAW`); a continual expert reads `_CONTINUAL_KEY_SOURCE`; any other task
  its own `split`, whole."""
  for prefix in _ELM_PREFIXES:
    if task.startswith(prefix):
      name = task[len(prefix):]
      dataset = {p["name"]: p["dataset"] for p in inventory.load_inventory()["prompt_experts"]}.get(name)
      if dataset is not None:
        source = name if name in seqio.TaskRegistry.names() else task
        first = inventory.WHOLE_SLICE.get(dataset, inventory.SLICE_THEN_DRAW.get(dataset))
        return source, "train", first
  continual = {e.name: e.dataset for e in inventory.CONTINUAL_EXPERTS}
  if task in continual:
    return (task, *_CONTINUAL_KEY_SOURCE[continual[task]])
  return task, split, None


def _split_dataset(task, split: str, first_rows: Optional[int]):
  tf_input.tensorflow()
  if split not in task.source.splits:
    raise InstanceError(f"task {task.name!r}: no split {split!r}; it has {list(task.source.splits)}")
  dataset = task.source.get_dataset(split=split, shuffle=False)
  return dataset if first_rows is None else dataset.take(first_rows)


def _instance_task(name: str):
  if name not in seqio.TaskRegistry.names():
    raise InstanceError(f"task {name!r} is not registered; register it (e.g. --setup=builtin or "
                        "--setup=module:function) or list the registered ones with `elm-jax tasks`")
  eval_twin = f"{name}_score_eval"
  return seqio.TaskRegistry.get(eval_twin if eval_twin in seqio.TaskRegistry.names() else name)


def sampled_instances(name: str, split: str, k: int, seed: int = KEY_SEED,
                      first_rows: Optional[int] = None) -> list[dict[str, Any]]:
  """The instances at the first `k` positions of `torch_randperm(n, seed)`, in that order, where n
  counts the instances of the first `first_rows` rows (None: all) of a task's split: rows of a
  text-to-text task, examples of a rank-classification one (its `_score_eval` twin when
  registered, as in `task_instances`). A mixture gives each member's draw in turn, cut at `k`.
  The split is streamed twice (count, then pick): only the picked rows are held."""
  if name in seqio.MixtureRegistry.names():
    members = [sampled_instances(t.name, split, k, seed, first_rows)
               for t in seqio.MixtureRegistry.get(name).tasks]
    out = [rows[i] for i in range(k) for rows in members if i < len(rows)]
    return out[:k]
  task = _instance_task(name)
  tf = tf_input.tensorflow()
  dataset = _split_dataset(task, split, first_rows)
  if isinstance(dataset.element_spec, dict) and "idx" in dataset.element_spec:
    example_id = lambda ex: tf.cast(tf.reshape(ex["idx"], [-1])[0], tf.int64)  # noqa: E731
    ids = dataset.map(example_id).batch(8192).as_numpy_iterator()
    example_ids = np.unique(np.concatenate([np.zeros(0, np.int64), *ids]))
    order = example_ids[torch_randperm(len(example_ids), seed, k)]
    if not len(order):
      return []
    last = int(order.max()) + 1  # mask[last] is False: every larger id is clipped to it
    mask = tf.constant(np.isin(np.arange(last + 1), order))
    picked = dataset.filter(lambda ex: tf.gather(mask, tf.minimum(example_id(ex), last)))
    by_id = _rank_instances_by_id(list(picked.as_numpy_iterator()), task.name)
    return [by_id[int(i)] for i in order]
  n = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
  order = torch_randperm(n, seed, k)
  if not len(order):
    return []
  mask = tf.constant(np.isin(np.arange(int(order.max()) + 1), order))
  picked = dataset.take(int(order.max()) + 1).enumerate().filter(lambda i, ex: tf.gather(mask, i))
  position = {int(i): row for i, row in picked.as_numpy_iterator()}
  return _from_text_rows([position[int(i)] for i in order], task.name)


def training_keys(task: str, num_keys: int = NUM_KEYS, seed: int = KEY_SEED,
                  split: str = "train") -> list[dict[str, Any]]:
  """The expert's retrieval keys, as the paper's `extract_data_subset_{seen,target}_train.py`
  picks them: the first `num_keys` of `torch.randperm(n, seed)` over the population `key_source`
  names (all of it when it has fewer rows), in draw order."""
  source, source_split, first_rows = key_source(task, split)
  return sampled_instances(source, source_split, num_keys, seed, first_rows)


def query_instances(task: str, num_queries: int = NUM_QUERIES, split: str = "validation",
                    labelled: bool = False, seed: int = KEY_SEED) -> list[dict[str, Any]]:
  """The target task's queries: the first `num_queries` of `torch.randperm(n, seed)` over the
  examples of its `split`, in draw order (the paper's first 32 entries of `unseen_eval_300.json`),
  labels dropped unless `labelled`."""
  rows = sampled_instances(task, split, num_queries, seed)
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
