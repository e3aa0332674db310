"""SeqIO tasks and mixtures of the ELM inventory, as the paper's runs used them.

Which rows of a split an expert trains on is `inventory.train_sample` (`sampling_follows`
'code', the default, or 'configs'): for the paper's code, the ten task classes whose
`AbstractTask.get` ignores `max_train_samples` (wiki_hop, amazon_polarity, yelp_review_full,
dbpedia_14, imdb, app_reviews: the first 50,000 rows; gigaword: the first 10,000; trec,
rotten_tomatoes: the whole split) train on that slice whatever the budget, multi_news on a
seed-42 draw from its first 10,000 rows, every other dataset on the first N of a seed-42
permutation of the whole split: the paper's `torch.randperm(n, generator seed 42)`, computed
without PyTorch (`randperm.torch_randperm`), so the same rows where the split is in the same
order as the paper's copy. The trainer reads the kept rows by index in a new permutation every
epoch (`tasks.row_order`), as the paper's trainer draws one.

- `elm_pe_<name>`: one task per prompt expert (296), cut as above. Every input ends with
  exactly one EOS, as the paper's T5 tokenizer ends it (P3 caches inputs without EOS: t-zero
  tokenized them with add_eos=False); an input that already ends with EOS is left alone.
- `<dataset>_all_prompts`: one mixture per adapter dataset expert (36): each of the dataset's
  prompt-expert prompts cut as above with the `*_all` config's per-prompt budget, mixed in
  proportion to their sizes for SeqIO readers; the trainer reads them concatenated, as the paper
  did (order 'concatenated': every epoch one permutation of every prompt's rows).
- `<dataset>_random_prompt`: the full-parameter dataset experts' data: every template of the
  dataset that the local P3 copy holds (its prompt-expert prompts when there is no copy, and for
  the 3 datasets built from raw data), each cut to the same seed-42 sample of at most 100,000
  row indices (the torch permutation above; the companion trainer's own seed-42 shuffle is not
  reproduced row for row), mixed at equal rates for SeqIO readers. The trainer reads it as the
  paper's companion trainer does (order 'template_per_row'): every epoch visits each sampled row
  once, rendered by one template drawn for it in that epoch. The paper excludes some templates
  by the example's label (trec's, paws' `paraphrase-task`, wiki_qa's generation templates); P3's
  subsets of those label-dependent templates hold only the rows they apply to, so they cannot be
  aligned to the dataset's rows and are never drawn here (`row_order.aligned_templates`).
- `t0_train`: T0's training mixture: every P3 training subset of T0's training datasets found
  in the local copy (not only ELM's 296 prompts), each at T0's rate, its example count capped
  at 500,000 / (that dataset's number of subsets). Inputs keep T0's convention (no EOS).
- `t0_eval_score`: the 113 original-task held-out prompts (P3 `_score_eval` subsets; hellaswag's
  `how_ends`, which P3 keeps only as text-to-text, is ranked from its answer choices).

Not in P3 as published (checked against P3's subset list): adversarial_qa's combined
`adversarialQA` config, commonsense_qa, hotpot_qa `fullwiki` (16 prompt experts) and
story_cloze 2016 (5 held-out prompts). Those are built from raw data and promptsource-format
templates (`tasks.templated`): `$ELM_RAW_DATA_DIR/<dataset>[/<subset>]/<split>.jsonl|.csv` or a
`datasets.save_to_disk` directory there, `$ELM_PROMPTSOURCE_DIR/<dataset>[/<subset>]/templates.yaml`,
tokenized with `$ELM_T5_VOCAB` (T5's spiece.model). Registered without them, such a task says
what to set when its data is first read.

Registration reads no data: counts for budgets and mixing rates are read when a dataset is
first requested.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Callable, Optional

import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError
from tasks import inventory, p3, randperm, rank_classification, row_order, templated, templates

T0_MAX_EXAMPLES_PER_DATASET = 500_000
SHUFFLE_SEED = 42
EOS_ID = 1
RAW_DATA_DIR_ENV = "ELM_RAW_DATA_DIR"
PROMPTSOURCE_DIR_ENV = "ELM_PROMPTSOURCE_DIR"
T5_VOCAB_ENV = "ELM_T5_VOCAB"
# (dataset, subset) of the inventory that P3 as published does not hold.
NOT_IN_P3 = {("adversarial_qa", "adversarialQA"), ("commonsense_qa", None), ("hotpot_qa", "fullwiki"),
             ("story_cloze", "2016")}
FULL_DE_SAMPLE = inventory.TrainSample(100_000, "permutation")  # the [C] trainer's (ELM_NOTES §1.6)
# T0's training datasets (t-zero's datasets.csv, do_train) as P3 subset-name prefixes.
T0_TRAIN_DATASETS = (
    "adversarial_qa_dbidaf", "adversarial_qa_dbert", "adversarial_qa_droberta", "ag_news",
    "amazon_polarity", "app_reviews", "cnn_dailymail_3.0.0", "common_gen", "cos_e_v1.11", "cosmos_qa",
    "dbpedia_14", "dream", "duorc_ParaphraseRC", "duorc_SelfRC", "gigaword", "glue_mrpc", "glue_qqp",
    "imdb", "kilt_tasks_hotpotqa", "multi_news", "paws_labeled_final", "qasc", "quail", "quarel",
    "quartz", "quoref", "ropes", "rotten_tomatoes", "samsum", "sciq", "social_i_qa", "trec", "wiki_bio",
    "wiki_hop_original", "wiki_qa", "wiqa", "xsum", "yelp_review_full")


def prompt_expert_task(name: str) -> str:
  return f"elm_pe_{name}"


def dataset_expert_mixture(name: str) -> str:
  return f"{name}_all_prompts"


def random_prompt_mixture(name: str) -> str:
  return f"{name}_random_prompt"


def t5_vocabulary():
  """T5's SentencePiece vocabulary from $ELM_T5_VOCAB (read when first used)."""
  path = os.environ.get(T5_VOCAB_ENV)
  if not path:
    raise MixtureError(f"${T5_VOCAB_ENV} is not set: point it at T5's spiece.model (e.g. the "
                       "backbone checkpoint's) to tokenize tasks built from raw data")
  return seqio.SentencePieceVocabulary(path)


class MixtureError(UserInputError):
  """A mixture that names a task no one registered."""


def add_mixture(name: str, members, default_rate=1.0, source: str = "mixture definition") -> None:
  """Registers a SeqIO mixture after checking that every member task or mixture exists
  (idempotent: an existing mixture of that name is left as it is)."""
  if name in seqio.MixtureRegistry.names():
    return
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  missing = [m for m in members if (m[0] if isinstance(m, tuple) else m) not in known]
  if missing:
    raise MixtureError(f"{source}: mixture {name!r} names unregistered task(s) {missing}; "
                       "register them first (see `elm-jax tasks list`)")
  seqio.MixtureRegistry.add(name, list(members), default_rate=default_rate)


def budget_rows(n: int, budget: Optional[int], sampling: str, seed: int = SHUFFLE_SEED,
                drawn_from: Optional[int] = None) -> Optional[np.ndarray]:
  """Which of a split's n rows an expert trains on (`inventory.TrainSample`): a bool mask [n] of
  the first `budget` rows ('first'), the first `budget` of `torch.randperm(population, generator
  seed `seed`)` ('permutation', as the paper's code draws `max_train_samples`) or the whole
  population ('all'), where the population is the first
  `drawn_from` rows (None: all n); None when that is every row."""
  if sampling not in ("permutation", "first", "all"):
    raise MixtureError(f"sampling: expected 'permutation', 'first' or 'all', got {sampling!r}")
  population = n if drawn_from is None else min(n, drawn_from)
  keep = np.zeros(n, bool)
  if sampling == "first" and budget is not None:
    keep[:min(budget, population)] = True
  elif sampling == "permutation" and budget is not None and population > budget:
    keep[randperm.torch_randperm(population, seed, budget)] = True
  else:
    keep[:population] = True
  return None if keep.all() else keep


def _budgeted_source(base: seqio.DataSource, sample: inventory.TrainSample,
                     count: Callable[[], int]) -> seqio.DataSource:
  """`base` with its train split cut to `sample` (`budget_rows`), in file order: what SeqIO readers
  of the task (evaluation, `tasks list`, counts) see. The trainer reads the same rows by index
  (`row_order.register_sample`, in `_register_budgeted`)."""
  tf = tf_input.tensorflow()
  whole = sample.sampling == "all" and sample.drawn_from is None

  def dataset_fn(split, shuffle_files, seed=None):
    if split != "train" or whole:
      return base.get_dataset(split=split, shuffle=shuffle_files, seed=seed)
    ds = base.get_dataset(split=split, shuffle=False)
    if sample.sampling == "first":
      return ds.take(sample.samples)
    keep = budget_rows(count(), sample.samples, sample.sampling, drawn_from=sample.drawn_from)
    if keep is None:
      return ds
    mask = tf.constant(keep)
    return ds.enumerate().filter(lambda i, ex: tf.gather(mask, i)).map(lambda i, ex: ex)
  return seqio.FunctionDataSource(dataset_fn, splits=base.splits)


def append_eos(dataset):
  """Ends every (tokenized) input with exactly one EOS, as the T5 tokenizer ends text."""
  tf = tf_input.tensorflow()

  def add(example):
    inputs = example["inputs"]
    ends = tf.logical_and(tf.size(inputs) > 0, tf.equal(inputs[-1], EOS_ID))
    example = dict(example)
    example["inputs"] = tf.cond(ends, lambda: inputs, lambda: tf.concat(
        [inputs, tf.constant([EOS_ID], inputs.dtype)], 0))
    return example
  return dataset.map(add)


def num_train_examples(subset: str, data_dir: Optional[str] = None) -> int:
  """Train-split size of a P3 subset: `stats.train.json`'s `examples`, else a record count."""
  known = known_train_sizes([subset], data_dir)
  if subset in known:
    return known[subset]
  directory = os.path.join(p3.p3_data_root(data_dir), subset)
  return _count_records(tuple(p3.shard_files(directory, "train")))


def known_train_sizes(subsets, data_dir: Optional[str] = None) -> dict[str, int]:
  """{subset: train-split size} for the subsets whose `stats.train.json` a local P3 copy holds
  (nothing else is read)."""
  root = p3.p3_data_root(data_dir)
  out = {}
  for subset in subsets:
    stats = os.path.join(root, subset, "stats.train.json")
    if os.path.isfile(stats):
      try:
        with open(stats) as f:
          out[subset] = int(json.load(f)["examples"])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise p3.P3DataError(f"{stats}: expected {{\"examples\": integer}} ({e})") from None
  return out


@functools.lru_cache(maxsize=None)
def _count_records(files: tuple[str, ...]) -> int:
  tf = tf_input.tensorflow()
  return int(sum(1 for f in files for _ in tf.data.TFRecordDataset(f)))


def _source_task(dataset: str, subset: Optional[str], name: str, data_dir: Optional[str],
                 template: Optional[str] = None) -> seqio.Task:
  """The raw (unbudgeted) task of a P3 subset name: read from P3, or, for datasets P3 does not
  hold, built from raw data and promptsource templates (`raw_templated_task`)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  if (dataset, subset) in NOT_IN_P3:
    return raw_templated_task(name, dataset, subset, template or name, score_eval=False)
  return p3.register_p3_task(name, data_dir)


def _register_budgeted(name: str, source: seqio.Task, sample: inventory.TrainSample,
                       count: Callable[[], int], eos: bool = True) -> str:
  """`source` with its train split cut to `sample`. A P3 task (pre-tokenized, no preprocessors)
  gets `append_eos`; a task rendered from raw text keeps its own tokenization, which ends inputs
  with EOS already."""
  if name not in seqio.TaskRegistry.names():
    preprocessors = list(source.preprocessors) or ([append_eos] if eos else [])
    seqio.TaskRegistry.add(name, source=_budgeted_source(source.source, sample, count),
                           output_features=source.output_features, preprocessors=preprocessors,
                           metric_fns=[])
    row_order.register_sample(name, source.name, lambda n: budget_rows(
        n, sample.samples, sample.sampling, drawn_from=sample.drawn_from))
  return name


def dataset_templates(dataset_expert: dict, data_dir: Optional[str] = None,
                      fallback: bool = True) -> Optional[list[str]]:
  """Every template (P3 training subset) of an inventory dataset expert's dataset in the local P3
  copy: `<name>_<template>` subsets with a train split, not `_score_eval`, not another dataset
  expert's. Its prompt-expert list when the dataset is built from raw data, and when there is no
  copy or the copy holds none of them (None then with `fallback=False`)."""
  if (dataset_expert["dataset"], dataset_expert["subset"]) in NOT_IN_P3:
    return list(dataset_expert["prompt_experts"])
  try:
    root = p3.p3_data_root(data_dir)
    listing = sorted(os.listdir(root))
  except (p3.P3DataError, OSError):
    return list(dataset_expert["prompt_experts"]) if fallback else None
  prefix = dataset_expert["name"] + "_"
  longer = [d["name"] + "_" for d in inventory.load_inventory()["dataset_experts"]
            if d["name"].startswith(prefix)]
  found = [s for s in listing if s.startswith(prefix) and not s.endswith("_score_eval")
           and not any(s.startswith(other) for other in longer)
           and os.path.isfile(os.path.join(root, s, "info.train.json"))]
  return found or (list(dataset_expert["prompt_experts"]) if fallback else None)


def register_elm_tasks(data_dir: Optional[str] = None, sampling_follows: str = "code") -> dict[str, list[str]]:
  """Registers the prompt-expert tasks and the mixtures above; returns mixture -> members.
  `sampling_follows` ('code' or 'configs') chooses which rows each expert's budget takes
  (`inventory.train_sample`)."""
  inv = inventory.load_inventory()
  registered: dict[str, list[str]] = {}
  rows = {pe["name"]: pe for pe in inv["prompt_experts"]}
  count = lambda subset: (lambda: train_size(subset, data_dir))  # noqa: E731

  for pe in inv["prompt_experts"]:
    source = _source_task(pe["dataset"], pe["subset"], pe["name"], data_dir, pe["prompt"])
    sample = inventory.train_sample(pe["dataset"], pe["max_train_samples"], sampling_follows)
    _register_budgeted(prompt_expert_task(pe["name"]), source, sample, count(pe["name"]))

  for de in inv["dataset_experts"]:
    config = de["adapter_config"] or {"max_train_samples": rows[de["prompt_experts"][0]]["max_train_samples"]}
    sample = inventory.train_sample(de["dataset"], config["max_train_samples"], sampling_follows)
    members = []
    for name in de["prompt_experts"]:
      source = seqio.TaskRegistry.get(name)
      members.append(_register_budgeted(f"elm_de_{name}", source, sample, count(name)))
    # The paper concatenates the prompts' examples: each member's share is its size.
    rate = lambda task, s=sample: float(s.rows(train_size(task.name[len("elm_de_"):], data_dir)))  # noqa: E731
    add_mixture(dataset_expert_mixture(de["name"]), members, default_rate=rate)
    row_order.register_order(dataset_expert_mixture(de["name"]), "concatenated")
    registered[dataset_expert_mixture(de["name"])] = members
    # The full-parameter dataset expert: every template of the dataset, one 100k sample of rows.
    full = []
    for name in dataset_templates(de, data_dir):
      source = (seqio.TaskRegistry.get(name) if name in seqio.TaskRegistry.names()
                else p3.register_p3_task(name, data_dir))
      full.append(_register_budgeted(f"elm_fde_{name}", source, FULL_DE_SAMPLE, count(name)))
    add_mixture(random_prompt_mixture(de["name"]), full)
    row_order.register_order(random_prompt_mixture(de["name"]), "template_per_row")
    registered[random_prompt_mixture(de["name"])] = full

  train = register_t0_train(data_dir)
  registered["t0_train"] = train

  held_out = []
  for entry in inv["held_out"]:
    if not entry["original_task"]:
      continue
    name = inventory.held_out_task_name(entry)
    if name not in seqio.TaskRegistry.names():
      subset = "2016" if entry["dataset"] == "story_cloze" else entry["subset"]
      if (entry["dataset"], subset) in NOT_IN_P3:
        raw_templated_task(name[:-len("_score_eval")], entry["dataset"], subset, entry["prompt"],
                           score_eval=True)
      else:
        # P3 keeps hellaswag's how_ends only as text-to-text: its rows carry the answer choices,
        # which rank classification reads (tasks.instances).
        p3_name = name if name != "hellaswag_how_ends_score_eval" else "hellaswag_how_ends"
        base = p3.register_p3_task(p3_name, data_dir,
                                   postprocess_fn=rank_classification.rank_classification_postprocessor,
                                   metric_fns=[rank_classification.seqio_rank_classification])
        if p3_name != name:
          seqio.TaskRegistry.add(name, source=base.source, output_features=base.output_features,
                                 preprocessors=[append_eos], metric_fns=[])
    held_out.append(name)
  add_mixture(inventory.HELD_OUT_MIXTURE, held_out)
  registered[inventory.HELD_OUT_MIXTURE] = held_out
  return registered


@functools.lru_cache(maxsize=None)
def train_size(subset: str, data_dir: Optional[str] = None) -> int:
  """The train-split size of a subset (cached per process): from P3's stats file or records, or,
  for a task built from raw data, by counting its rendered training rows."""
  task = seqio.TaskRegistry.get(subset) if subset in seqio.TaskRegistry.names() else None
  if task is not None and task.preprocessors:  # rendered from raw data
    return int(sum(1 for _ in task.source.get_dataset(split="train", shuffle=False)))
  return num_train_examples(subset, data_dir)


def t0_train_subsets(data_dir: Optional[str] = None) -> list[str]:
  """Every P3 training subset of T0's training datasets in the local copy (sorted), i.e. every
  prompt T0 trained on: subsets named `<dataset>_<prompt>` with a train split, not `_score_eval`."""
  root = p3.p3_data_root(data_dir)
  out = []
  for subset in sorted(os.listdir(root)):
    if subset.endswith("_score_eval") or not os.path.isdir(os.path.join(root, subset)):
      continue
    if any(subset.startswith(prefix + "_") for prefix in T0_TRAIN_DATASETS) and \
        os.path.isfile(os.path.join(root, subset, "info.train.json")):
      out.append(subset)
  return out


def t0_dataset(subset: str) -> str:
  """The T0 training dataset a P3 subset belongs to (the longest matching prefix)."""
  return max((p for p in T0_TRAIN_DATASETS if subset.startswith(p + "_")), key=len)


def register_t0_train(data_dir: Optional[str] = None) -> list[str]:
  """`t0_train`: every subset of `t0_train_subsets`, at T0's rate: its train-example count, or
  500,000 / (the number of its dataset's subsets) when the dataset has more than 500,000
  examples. Subsets are read as P3 publishes them (inputs without EOS, T0's convention). The
  subset list is read from the local copy when the mixture is first registered."""
  if "t0_train" in seqio.MixtureRegistry.names():
    return [t.name for t in seqio.MixtureRegistry.get("t0_train").tasks]
  try:
    subsets = t0_train_subsets(data_dir)
  except p3.P3DataError:
    return []  # no local P3 copy: `t0_train` is registered once there is one
  per_dataset: dict[str, int] = {}
  for subset in subsets:
    per_dataset[t0_dataset(subset)] = per_dataset.get(t0_dataset(subset), 0) + 1
  for subset in subsets:
    p3.register_p3_task(subset, data_dir)

  def t0_rate(task) -> float:
    n = train_size(task.name, data_dir)
    if n > T0_MAX_EXAMPLES_PER_DATASET:
      return T0_MAX_EXAMPLES_PER_DATASET // per_dataset[t0_dataset(task.name)]
    return n
  if subsets:
    add_mixture("t0_train", subsets, default_rate=t0_rate)
  return subsets


def raw_templated_task(name: str, dataset: str, subset: Optional[str], template_name: str, *,
                       score_eval: bool) -> seqio.Task:
  """Task `name` (and `name_score_eval` when its template has answer choices) rendered from raw
  data with a promptsource-format template (`tasks.templated`). The template is the one of
  `$ELM_PROMPTSOURCE_DIR/<dataset>[/<subset>]/templates.yaml` whose name matches `template_name`
  once P3's naming is applied (runs of other characters than letters, digits, '.' and '_'
  become '_'). Without the three environment variables the task is registered anyway and says
  what to set when its data is first read."""
  relative = os.path.join(dataset, subset) if subset else dataset
  raw_root, templates_root = os.environ.get(RAW_DATA_DIR_ENV), os.environ.get(PROMPTSOURCE_DIR_ENV)
  if not (raw_root and templates_root and os.environ.get(T5_VOCAB_ENV)):
    message = (f"{name}: {relative} is not in P3 as published; build it from raw data and templates "
               f"by setting ${RAW_DATA_DIR_ENV} (holding {relative}/), ${PROMPTSOURCE_DIR_ENV} "
               f"(promptsource's templates folder) and ${T5_VOCAB_ENV}")
    if score_eval:
      unavailable_task(name + "_score_eval", message)
    return unavailable_task(name, message)
  template_file = os.path.join(templates_root, relative, "templates.yaml")
  data_dir = os.path.join(raw_root, relative)
  sources = {split: _raw_source(data_dir, split) for split in ("train", "validation")}
  matched = _template_by_p3_name(template_file, template_name)
  templated.register_templated_task(name, template_file, matched, t5_vocabulary(), sources=sources)
  return seqio.TaskRegistry.get(name)


def _raw_source(directory: str, split: str) -> str:
  for suffix in (".jsonl", ".json", ".csv", ".tsv"):
    path = os.path.join(directory, split + suffix)
    if os.path.isfile(path):
      return path
  return f"hf:{directory}"


def _template_by_p3_name(template_file: str, wanted: str) -> str:
  if not os.path.isfile(template_file):
    raise MixtureError(f"{template_file}: promptsource templates file not found")
  names = list(templates.load_templates(template_file))
  p3_name = lambda n: re.sub(r"[^\w\d\._]+", "_", n)  # noqa: E731
  for name in names:
    if name == wanted or p3_name(name) == wanted or p3_name(name).strip("_") == wanted.strip("_"):
      return name
  raise MixtureError(f"{template_file}: no template named like {wanted!r}; it has {sorted(names)}")


def unavailable_task(name: str, message: str) -> seqio.Task:
  """A registered task whose data, when read, raises `message` (what to set to get it)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)

  def dataset_fn(split, shuffle_files, seed=None):
    raise p3.P3DataError(message)
  vocabulary = seqio.PassThroughVocabulary(size=32128, eos_id=1)
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=p3.SPLITS),
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, dtype="int32"),
                       "targets": seqio.Feature(vocabulary, add_eos=False, dtype="int32")},
      preprocessors=[], metric_fns=[])


# The paper's list repeats one sub-task (`retrieval/make_benchmarks.py`), so its examples count
# twice in that task's score; kept, as the paper reports it.
BIGBENCH_REPEATED_SUBTASKS = {"conceptual_combinations": ("homonyms",)}


def register_bigbench_13(data_dir: str, vocabulary) -> list[str]:
  """The paper's 13 BIG-bench tasks from a BIG-bench checkout's `benchmark_tasks` directory
  (`<task>/task.json`, or `<task>/<subtask>/task.json` for tasks with sub-tasks): each sub-task
  as `bigbench_<task>_<subtask>`, each of the 13 tasks as `bigbench_<task>` holding its
  sub-tasks' examples together (the paper groups them so; conceptual_combinations' homonyms
  twice, as its list has them), and the mixture `bigbench_13` of the 13 tasks' _score_eval
  twins. Files are read when a dataset is requested."""
  members = []
  for entry in inventory.load_inventory()["bigbench"]:
    task = entry["task"]
    paths = []
    subtasks = list(entry["subtasks"]) + list(BIGBENCH_REPEATED_SUBTASKS.get(task, ()))
    for subtask in subtasks or [None]:
      parts = [task] + ([subtask] if subtask else [])
      path = os.path.join(data_dir, *parts, "task.json")
      paths.append(path)
      if subtask:
        templated.register_bigbench_task("bigbench_" + "_".join(parts), path, vocabulary)
    members.append(templated.register_bigbench_group(f"bigbench_{task}", paths, vocabulary)[-1])
  add_mixture(inventory.BIGBENCH_MIXTURE, members)
  return members
