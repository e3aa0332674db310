"""The Python API: every step of the Expert Language Models workflow, for notebooks and scripts.

Each function takes Python values (lists, numbers, paths), not command-line flags, and runs the
same code as the command of the same step (`elm_jax/commands/`), so it gives the same results
and the same errors (`elm_jax.errors.UserInputError` subclasses, naming the argument or file and
what was expected). The workflow, on the built-in task suite (no download):

    from elm_jax import api
    api.runtime()                                   # {'backend': 'cpu', 'devices': 1, ...}
    config = api.model_config("models/t5_1_1_mini.gin")
    backbone = api.build_backbone("/tmp/qs/backbone", config)
    api.train_experts("/tmp/qs/run", ["builtin_sentiment_is_positive", "builtin_topic_which_topic"],
                      steps=50, backbone=backbone, learning_rate=1e-3)      # a progress bar
    api.add_experts("/tmp/qs/lib", ["/tmp/qs/run"])                          # `library add`
    rows = api.task_examples("builtin_nli_can_we_infer_score_eval", max_examples=8)
    scores = api.score("/tmp/qs/lib", rows)                                  # scores [E, N, C]
    chosen = api.select_experts("/tmp/qs/lib", task="builtin_nli_can_we_infer_score_eval")
    api.merge("/tmp/qs/lib", chosen, "top2", top_k=2)                        # `merge`
    table = api.evaluate("/tmp/qs/lib", "builtin_held_out", max_examples=32) # `eval`
    table.rows                                                               # list of dicts

Commands and functions, step by step: `train` -> `train_experts`; `library add` ->
`add_experts`, `open_library`; `score --library` -> `score`; `retrieve` -> `select_experts`
(and `select_merge_evaluate`, the route-merge-evaluate recipe); `route` -> `route` (experts mixed
per token or per example); `train-gates` -> `train_gates` (PHATGOOSE's gates, for
`route(method="phatgoose")`); `merge` -> `merge`; `eval` ->
`evaluate`. docs/API.md lists every function with an example; `help(api.NAME)` shows its
arguments.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from elm_jax import compile_cache, defaults, partitioning
from elm_jax.checkpoints import hf, loading
from elm_jax.commands import (eval_command, gin_utils, retrieve_command, route_command,
                              score_command, train_command)
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval, placement
from elm_jax.evaluation.expert_eval import TaskResult
from elm_jax.library import loaded as library_loaded
from elm_jax.library import gates as library_gates
from elm_jax.library import adding, merge_and_add, routing_methods, selection
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from elm_jax.training import run as training_run
from elm_jax.training import train_step
from tasks import instances
from tasks.builtin_registry import builtin_vocabulary

__all__ = ["runtime", "model_config", "build_backbone", "load_backbone", "train_experts", "open_library",
           "add_experts", "load_experts", "task_examples", "score", "Scores", "select_experts",
           "select_merge_evaluate", "route", "train_gates", "merge", "evaluate", "Evaluation"]

_cache_ready = False


def _start() -> None:
  """What every command does before it runs: the persistent compilation cache (once)."""
  global _cache_ready
  if not _cache_ready:
    compile_cache.enable()
    _cache_ready = True


def _mesh(mesh) -> Optional[partitioning.MeshConfig]:
  """A MeshConfig from `mesh`: None (choose from the devices), a MeshConfig, or the `--mesh`
  text 'data:D,expert:E,model:M'."""
  if mesh is None or isinstance(mesh, partitioning.MeshConfig):
    return mesh
  if isinstance(mesh, str):
    return placement.parse_mesh_flag(mesh)
  raise UserInputError(f"mesh: expected None, a partitioning.MeshConfig or 'data:D,expert:E,model:M', got {mesh!r}")


def _library_dir(library) -> str:
  """The directory of `library`: a path, or an ExpertLibrary."""
  return os.fspath(library.root) if isinstance(library, ExpertLibrary) else os.fspath(library)


# ---------------------------------------------------------------------------- runtime and backbone
def runtime() -> dict[str, Any]:
  """The JAX runtime this process sees: {'backend': 'cpu' | 'gpu' | 'tpu', 'devices': count over
  every process, 'local_devices', 'processes', 'device_kind'}. Scoring and evaluation use every
  device (experts on the mesh's `expert` axis) and print the layout they choose.

      api.runtime()   # {'backend': 'tpu', 'devices': 8, 'local_devices': 8, 'processes': 1, ...}
  """
  return {"backend": jax.default_backend(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "processes": jax.process_count(),
          "device_kind": jax.devices()[0].device_kind}


def model_config(gin_file: str = "models/t5_1_1_mini.gin", **overrides: Any) -> T5Config:
  """The T5Config that a model gin file binds (`MODEL_CONFIG`; looked up as `--gin_file` is:
  the working directory, the repo, `gin_configs/`), with `overrides` (T5Config fields) applied.

      config = api.model_config("models/t5_1_1_mini.gin")          # the built-in suite's size
      config = api.model_config("models/t5_1_1_xl.gin", dtype="bfloat16")
  """
  try:
    gin_utils.parse_gin(gin_utils.GinFlags(files=[gin_file]))
    config = gin_utils.model_config_from_gin()
  finally:
    gin_utils.parse_gin(gin_utils.GinFlags())  # clears gin: nothing else reads this file's bindings
  try:
    return config.replace(**overrides)
  except TypeError as e:
    raise UserInputError(f"model_config({gin_file!r}): {e}; the fields are T5Config's") from None


def build_backbone(path: str, config: T5Config, *, seed: int = 0, vocabulary: Optional[str] = None) -> str:
  """Writes a randomly initialised backbone of `config` as a Hugging Face checkpoint directory
  `path` (with the SentencePiece model `vocabulary`; default: the built-in suite's) and returns
  `path`; experts trained on it (`train_experts(backbone=path)`) record its fingerprint. A
  directory already holding a checkpoint is refused, not replaced.

      backbone = api.build_backbone("/tmp/qs/backbone", api.model_config())
  """
  _start()
  # As `train` initialises a backbone when none is given: compiled, then saved as Hugging Face.
  params = jax.device_get(jax.jit(lambda key: nn.unbox(init_params(config, key)))(jax.random.PRNGKey(seed)))
  hf.save_hf_checkpoint(params, config, path, vocab_path=vocabulary or builtin_vocabulary())
  return os.path.abspath(path)


def load_backbone(checkpoint: str, *, config: Optional[T5Config] = None, dtype: Optional[str] = None):
  """A backbone checkpoint (Hugging Face directory, or T5X with its `config`), as the commands
  load one: a LoadedModel with `.config`, `.model` (the EncoderDecoderModel), `.params` and
  `.vocab_path`.

      backbone = api.load_backbone("/tmp/qs/backbone")
      backbone.config.emb_dim                                     # 64
  """
  _start()
  return loading.load_model_checkpoint(checkpoint, config=config, dtype=dtype)


# ---------------------------------------------------------------------------- training
def train_experts(model_dir: str, tasks: Optional[Sequence[str]] = None, steps: Optional[int] = None, *,
                  gin_files: Sequence[str] = (), gin_bindings: Optional[Mapping[str, Any]] = None,
                  config: Optional[T5Config] = None, backbone: Optional[str] = None,
                  names: Optional[Sequence[str]] = None, kind: str = "adapter", reduction_factor: int = 32,
                  batch_size: int = 8, input_length: int = defaults.TRAIN_INPUT_LENGTH,
                  target_length: int = defaults.TRAIN_TARGET_LENGTH, learning_rate: float = 1e-4,
                  seed: int = 42, mesh=None, setup: Optional[str] = None,
                  progress: bool = True) -> dict[str, dict[str, float]]:
  """Trains one expert per task, all at once (vmapped), and exports each to
  `model_dir/experts/NAME/` (what `library add` reads); returns {expert name: final metrics}.
  A progress bar shows the steps (on stderr, which a notebook shows under the cell).

  Either a list of `tasks` for `steps` steps, with the settings of `runs/train_experts.gin`
  (the paper's recipe: `kind` 'adapter' with `reduction_factor` 32, AdamW at `learning_rate`
  decayed linearly to 0, clip 1.0, every expert from one draw of `seed`) over `backbone` (a
  checkpoint directory; None: a random backbone of `config`, default the mini model, saved in
  `model_dir/backbone`); or a gin recipe: `gin_files` and `gin_bindings` ({macro: value}, e.g.
  {'TRAIN_STEPS': 10}), as `elm-jax train --gin_file=... --gin.NAME=VALUE` reads them, with
  `model_dir`, `tasks` and `steps` bound as MODEL_DIR, EXPERT_TASKS and TRAIN_STEPS when given.
  `mesh`: None (one device), a partitioning.MeshConfig or 'data:D,expert:E,model:M'.
  `setup`: tasks to register first ('builtin', 'elm', 'module:function'); built-in tasks are
  found by themselves.

      api.train_experts("/tmp/qs/run", ["builtin_sentiment_is_positive"], steps=50, learning_rate=1e-3)
      api.train_experts("/tmp/qs/run", gin_files=["models/t5_1_1_mini.gin", "runs/train_builtin_experts.gin"])
  """
  _start()
  instances.register_setup(setup)
  if gin_files:
    bindings = dict(gin_bindings or {})
    for macro, value in (("MODEL_DIR", model_dir), ("EXPERT_TASKS", list(tasks) if tasks else None),
                         ("TRAIN_STEPS", steps), ("EXPERT_NAMES", list(names) if names else None)):
      if value is not None:
        bindings[macro] = value
    gin_utils.parse_gin(gin_utils.GinFlags(files=list(gin_files),
                                           bindings=[f"{k} = {v!r}" for k, v in bindings.items()]))
    try:
      return train_command.train_configured(progress=progress)
    finally:
      gin_utils.parse_gin(gin_utils.GinFlags())
  if gin_bindings:
    raise UserInputError("gin_bindings: bind macros of a gin recipe; pass gin_files too, or give the "
                         "settings as arguments")
  if tasks is None or steps is None or isinstance(tasks, str):
    raise UserInputError(f"train_experts: pass a list of tasks and steps, or gin_files (a recipe); got "
                         f"tasks={tasks!r}, steps={steps!r}")
  instances.ensure_registered(list(tasks))
  optimizer = train_step.OptimizerConfig(name="adamw", learning_rate=learning_rate, schedule="linear",
                                         max_grad_norm=1.0)
  return training_run.train(
      model_dir, list(tasks), steps, model_config=config or model_config(), backbone_checkpoint=backbone,
      expert_names=list(names) if names else None, batch_size=batch_size, input_length=input_length,
      target_length=target_length, seed=seed, expert_config=ExpertConfig(kind=kind, reduction_factor=reduction_factor),
      optimizer_config=optimizer, progress=progress, mesh_config=_mesh(mesh), shared_init=True)


# ---------------------------------------------------------------------------- the library
def open_library(path: str, *, create: bool = False, check_integrity: bool = True) -> ExpertLibrary:
  """The Expert Library in `path` (a local path or any `etils.epath` URL: Drive, gs://), made
  empty when `create` and not there yet. `.names()` lists its experts, `.entry(name)` one
  expert's manifest entry, `.verify()` rechecks every file.

      library = api.open_library("/tmp/qs/lib")
      library.names()                                  # ['builtin_sentiment_is_positive', ...]
  """
  return ExpertLibrary(path, create=create, check_integrity=check_integrity)


def add_experts(library, paths: Sequence[str], *, keys: str = "auto", name: Optional[str] = None,
                checkpoint: Optional[str] = None, setup: Optional[str] = None) -> list[str]:
  """`elm-jax library add`: copies experts into the library (made when missing) and returns
  the names it holds. `paths`: expert directories, training run directories (their experts/),
  or PEFT and AdapterHub folders (imported for `checkpoint`). `keys`: 'auto' (100 training
  instances of each expert's task, for retrieval), 'none', or a JSONL file. Prints a line per
  expert, as the command does; experts already there with the same files are skipped.

      api.add_experts("/tmp/qs/lib", ["/tmp/qs/run"])
      api.add_experts("/tmp/qs/lib", ["/tmp/qs/run/experts/builtin_topic_which_topic"], keys="none")
  """
  if isinstance(paths, (str, os.PathLike)):
    raise UserInputError(f"paths: expected a list of directories, got {paths!r}")
  _start()
  adding.add_experts(_library_dir(library), [os.fspath(p) for p in paths], keys=keys, name=name,
                     checkpoint=checkpoint, setup=setup, log=print)
  return ExpertLibrary(_library_dir(library)).names()


def load_experts(library, experts: str | Sequence[str] = "all", *, checkpoint: Optional[str] = None,
                 config: Optional[T5Config] = None, dtype: Optional[str] = None, force: bool = False,
                 check_integrity: bool = True):
  """The library's `experts` ('all' or names) on their backbone, every file checked, stacked
  once: a LoadedExperts (`.names`, `.stack` [E, ...] leaves, `.model`, `.backbone`), what
  `score`, `eval` and `retrieve` load.

      experts = api.load_experts("/tmp/qs/lib", ["builtin_sentiment_is_positive"])
      experts.names                                     # ('builtin_sentiment_is_positive',)
  """
  _start()
  return library_loaded.load_experts(_library_dir(library), experts, checkpoint=checkpoint, config=config,
                                     dtype=dtype, force=force, check_integrity=check_integrity)


def task_examples(task: str, *, split: str = "validation", max_examples: Optional[int] = defaults.MAX_EXAMPLES,
                  setup: Optional[str] = None) -> list[dict[str, Any]]:
  """Up to `max_examples` examples of a registered task's `split`, as `score` takes them:
  [{"id": index, "inputs": text, "choices": [text, ...], "label": index}] (a generation task's
  have "targets" instead of choices and label).

      rows = api.task_examples("builtin_nli_can_we_infer_score_eval", max_examples=8)
      rows[0]["choices"]                                # ['yes', 'maybe', 'no']
  """
  instances.register_setup(setup)
  instances.ensure_registered([task])
  out = []
  for i, row in enumerate(expert_eval.read_task_rows(task, split, max_examples)):
    example = {"id": i, "inputs": row["inputs"]}
    if row.get("answer_choices"):
      example.update(choices=list(row["answer_choices"]), label=row.get("label"))
    else:
      example["targets"] = row.get("targets")
    out.append(example)
  return out


# ---------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class Scores:
  """Every expert's rank-classification scores of N examples: `scores` [E, N, C] (log-likelihood
  of each choice's tokens plus EOS given the input; -inf where an example has fewer than C
  choices), `counts` [N, C] (tokens per choice, EOS included; 0 on padding), `experts` (E names,
  the order of the first axis), `ids` (the N examples' ids)."""
  experts: tuple[str, ...]
  ids: tuple[Any, ...]
  scores: np.ndarray
  counts: np.ndarray

  def predictions(self, length_normalize: bool = False) -> np.ndarray:
    """[E, N] index of each expert's best choice per example (by score, or by score per token:
    `score --length_normalize`)."""
    values = self.scores / np.maximum(self.counts, 1)[None] if length_normalize else self.scores
    return np.argmax(values, axis=-1)

  def accuracy(self, labels: Sequence[int], length_normalize: bool = False) -> dict[str, float]:
    """{expert: % of examples whose prediction is the label}; `labels` [N]."""
    labels = np.asarray(labels)
    if labels.shape != (len(self.ids),):
      raise UserInputError(f"labels: expected {len(self.ids)} labels (one per example), got shape {labels.shape}")
    hits = self.predictions(length_normalize) == labels[None, :]
    return {name: float(100.0 * hits[e].mean()) for e, name in enumerate(self.experts)}


def score(library, examples: Sequence[Mapping[str, Any]], *, experts: str | Sequence[str] = "all",
          batch_size: int = defaults.BATCH_SIZE, max_input_length: int = defaults.MAX_INPUT_LENGTH,
          max_target_length: int = defaults.MAX_TARGET_LENGTH, expert_chunk: Optional[int] = None, mesh=None,
          checkpoint: Optional[str] = None, config: Optional[T5Config] = None, dtype: Optional[str] = None,
          softmax_vocab_size: Optional[int] = None, check_integrity: bool = True) -> Scores:
  """`elm-jax score --library`: every selected expert scores every example's choices in one
  vmapped pass (on every device, experts on the mesh's `expert` axis; `mesh` as in
  `train_experts`), returned as arrays. `examples`: [{"inputs": text, "choices": [text, ...]}]
  (an "id" is kept, else the index is the id; `task_examples` gives them). Inputs and choices
  longer than the lengths are cut, and reported once.

      scores = api.score("/tmp/qs/lib", [{"inputs": "Is 'great film' positive?", "choices": ["yes", "no"]}])
      scores.scores.shape, scores.predictions()         # (E, 1, 2), [E, 1]
  """
  if isinstance(examples, Mapping) or isinstance(examples, str) or not examples:
    raise score_command.InputError(f"examples: expected a non-empty list of {{inputs, choices}}, got {examples!r:.80}")
  records = [score_command.check_example({"id": i, **r} if isinstance(r, Mapping) and "id" not in r else r,
                                         f"examples[{i}]") for i, r in enumerate(examples)]
  _start()
  loaded = library_loaded.load_experts(_library_dir(library), experts, checkpoint=checkpoint, dtype=dtype,
                                       check_integrity=check_integrity, config=config,
                                       softmax_vocab_size=softmax_vocab_size)
  scores, counts = score_command.library_scores(
      loaded, records, batch_size=batch_size, expert_chunk=expert_chunk, mesh_config=_mesh(mesh),
      max_input_length=max_input_length, max_target_length=max_target_length,
      softmax_vocab_size=softmax_vocab_size, source="examples")
  return Scores(tuple(loaded.names), tuple(r["id"] for r in records), np.asarray(scores), np.asarray(counts))


# ---------------------------------------------------------------------------- selection and merging
def _queries(task: Optional[str], queries, method: str, num_queries: int, split: str, setup: Optional[str]):
  """(queries, source): `queries` as given, or `num_queries` of `task`'s `split` as `retrieve`
  draws them (labelled only for a labelled method)."""
  if (task is None) == (queries is None):
    raise selection.SelectionError("pass exactly one of task=NAME (its validation inputs are the queries, "
                                   "as `retrieve` draws them) and queries=[text or instance, ...]")
  if queries is not None:
    return queries, "queries"
  instances.register_setup(setup)
  instances.ensure_registered([task])
  labelled = selection.selection_method(method).labelled
  return instances.query_instances(task, num_queries, split, labelled=labelled), f"task {task}"


def select_experts(library, task: Optional[str] = None, *, queries: Optional[Sequence] = None,
                   method: str = "roe", experts: str | Sequence[str] = "all", embedder: Any = "minilm",
                   text_format: str = instances.DEFAULT_TEXT_FORMAT, criterion: str = "entropy",
                   num_queries: int = instances.NUM_QUERIES, split: str = "validation",
                   setup: Optional[str] = None, batch_size: int = defaults.BATCH_SIZE,
                   expert_chunk: Optional[int] = None, mesh=None, checkpoint: Optional[str] = None,
                   config: Optional[T5Config] = None, check_integrity: bool = True) -> selection.Selection:
  """`elm-jax retrieve`: the library's experts ranked for an unseen task, from `num_queries` of
  the `task`'s inputs (drawn as `retrieve` draws them) or from `queries` (a handful of raw input
  strings, or instances {"inputs", "answer_choices"?, "label"?}). `method`: 'roe' (Retrieval of
  Experts: nearest-key votes, reading only the library's keys; `embedder` 'minilm', 't5' or
  'bm25'), 'likelihood' (lowest entropy over the choices, or `criterion` 'max_prob') or
  'oracle' (accuracy on labelled queries). Returns a Selection: `.top(k)`, `.ranking()` (the
  list `retrieve --output` writes), `.experts`, `.scores`.

      chosen = api.select_experts("/tmp/qs/lib", task="builtin_nli_can_we_infer_score_eval")
      chosen.top(2)                                     # the two best experts' names
  """
  rows, source = _queries(task, queries, method, num_queries, split, setup)
  _start()
  return retrieve_command.select(_library_dir(library), rows, method=method, experts=experts, embedder=embedder,
                                 text_format=text_format, criterion=criterion, checkpoint=checkpoint,
                                 batch_size=batch_size, expert_chunk=expert_chunk, mesh_config=_mesh(mesh),
                                 check_integrity=check_integrity, model_config=config, source=source)


def select_merge_evaluate(library, task: str, *, methods: Sequence[str] = ("roe",), top_k: int = 3,
                          experts: str | Sequence[str] = "all", queries: Optional[Sequence] = None,
                          num_queries: int = instances.NUM_QUERIES, embedder: Any = "minilm",
                          criterion: str = "entropy", max_examples: Optional[int] = defaults.MAX_EXAMPLES,
                          batch_size: int = defaults.BATCH_SIZE, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                          max_target_length: int = defaults.MAX_TARGET_LENGTH, setup: Optional[str] = None,
                          checkpoint: Optional[str] = None, config: Optional[T5Config] = None):
  """The paper's recipe for an unseen `task` (`selection.select_merge_evaluate`, as the demo
  runs it): for each of `methods`, select among the library's `experts` from the task's queries
  (or `queries`), merge the top `top_k` (uniform mean, in memory: nothing is written), and
  evaluate each merged expert on up to `max_examples` of the task, all in one pass. Returns a
  list of MergedSelection (`.selection`, `.members`, `.metric`, `.score`), one per method.

      merged = api.select_merge_evaluate("/tmp/qs/lib", "builtin_nli_can_we_infer_score_eval", top_k=2)
      merged[0].members, merged[0].score                # the merged experts, their accuracy (%)
  """
  labelled = any(selection.selection_method(m).labelled for m in methods)
  rows, source = _queries(task if queries is None else None, queries, "oracle" if labelled else "roe",
                          num_queries, "validation", setup)
  _start()
  loaded = library_loaded.load_experts(_library_dir(library), experts, checkpoint=checkpoint, config=config)
  scoring = dict(batch_size=batch_size, max_input_length=max_input_length, max_target_length=max_target_length)
  return selection.select_merge_evaluate(
      list(methods), loaded, task, queries=rows, top_k=top_k, embedder=embedder, criterion=criterion,
      source=source, checkpoint=checkpoint, model_config=config, scoring=scoring,
      evaluation=dict(scoring, max_examples=max_examples))


def route(library, task: str, *, method: str = "arrow", experts: str | Sequence[str] = "all", top_k: int = 1,
          temperature: float = 1.0, expert: Optional[str] = None, embedder: Any = "minilm",
          text_format: str = instances.DEFAULT_TEXT_FORMAT, neighbours: int = routing_methods.NEIGHBOURS,
          split: str = "validation", max_examples: Optional[int] = defaults.MAX_EXAMPLES,
          batch_size: int = defaults.BATCH_SIZE, max_input_length: int = defaults.MAX_INPUT_LENGTH,
          max_target_length: int = defaults.MAX_TARGET_LENGTH, mesh=None, setup: Optional[str] = None,
          checkpoint: Optional[str] = None, config: Optional[T5Config] = None,
          check_integrity: bool = True, beam_size: int = 1) -> routing_methods.RoutedResult:
  """`elm-jax route`: the library's `experts` routed on up to `max_examples` of `task`'s
  examples, their outputs mixed per token or per example in one pass (experts on the mesh's
  `expert` axis). `method`: 'arrow' (per token and module, the `top_k` experts whose
  prototypes best match the token, softmax(score / `temperature`)), 'retrieval' (per example:
  its `neighbours` nearest retrieval keys vote; `embedder` 'minilm', 't5' or 'bm25'),
  'phatgoose' (per token and module, the `top_k` experts whose trained gates best match the
  standardised token, softmax(score / `temperature`); the experts' gates: `train_gates`),
  'uniform' (weight 1/E) or 'forced' (every example to `expert`). A task without answer
  choices is decoded (`max_target_length` tokens, `beam_size` beams). Returns a RoutedResult
  (`.accuracy` %, `.metrics`, `.scores` [N, C] or None, `.predictions` [N] choice indices or
  texts, `.computed_from`). `evaluate(..., routing=[...])` runs methods as resumable sweep columns.

      routed = api.route("/tmp/qs/lib", "builtin_nli_can_we_infer_score_eval", method="uniform")
      routed.accuracy                                   # % of the examples the mixture gets right
  """
  _start()
  return route_command.route_task(
      _library_dir(library), task, method=method, experts=experts, top_k=top_k, temperature=temperature,
      expert=expert, embedder=embedder, text_format=text_format, neighbours=neighbours, split=split,
      max_examples=max_examples, checkpoint=checkpoint, batch_size=batch_size,
      max_input_length=max_input_length, max_target_length=max_target_length, mesh_config=_mesh(mesh),
      check_integrity=check_integrity, model_config=config, setup=setup, beam_size=beam_size)


def train_gates(library, model_dir: str, experts: str | Sequence[str] = "all", *, steps: int = 100,
                learning_rate: float = 1e-3, batch_size: int = 8, input_length: int = defaults.TRAIN_INPUT_LENGTH,
                target_length: int = defaults.TRAIN_TARGET_LENGTH, seed: int = defaults.SEED, save_every: int = 100,
                tasks: Optional[Mapping[str, str]] = None, setup: Optional[str] = None,
                checkpoint: Optional[str] = None, config: Optional[T5Config] = None,
                check_integrity: bool = True, mesh=None) -> library_gates.GatesResult:
  """`elm-jax train-gates`: PHATGOOSE's gates for the library's `experts` that have none: one
  gate vector per routed module of each expert, trained for `steps` steps on the expert's own
  task (or `tasks[name]`) with the expert frozen, every expert in one vmapped program, from 0,
  AdamW at `learning_rate`; checkpoints in `model_dir` (the same call after a kill resumes
  there). The gates are stored beside each expert in the library; `route(..., method=
  "phatgoose")` reads them. `mesh`: as `evaluate`'s, the run split over it (None: one device).
  Returns a GatesResult (`.trained`, `.skipped`, `.metrics`).

      api.train_gates("/tmp/qs/lib", "/tmp/qs/gates", steps=100)
      api.route("/tmp/qs/lib", "builtin_nli_can_we_infer_score_eval", method="phatgoose", top_k=2)
  """
  _start()
  instances.register_setup(setup)
  return library_gates.train_gates(_library_dir(library), model_dir, experts, steps=steps,
                                   learning_rate=learning_rate, batch_size=batch_size, input_length=input_length,
                                   target_length=target_length, seed=seed, save_every=save_every, tasks=tasks,
                                   checkpoint=checkpoint, check_integrity=check_integrity, config=config,
                                   mesh_config=_mesh(mesh))


def merge(library, experts: Sequence[str] | selection.Selection, name: str, *, top_k: Optional[int] = None,
          method: str = "uniform", weights: Optional[Sequence[float]] = None, scale: float = 1.0,
          density: float = 0.2, checkpoint: Optional[str] = None, config: Optional[T5Config] = None) -> dict:
  """`elm-jax merge`: merges library experts into a new expert `name`, saved to the library with
  its provenance (returned: {merged_from, method, weights, scale, density}). `experts`: names,
  or a Selection from `select_experts` with `top_k` (as `merge --ranking --top_k`). `method`:
  'uniform' (the paper's mean), 'weighted' (`weights`), 'task_arithmetic' / 'ties' (`scale`,
  `density`) or a kind's own ('lora_updates', 'lora_factors').

      api.merge("/tmp/qs/lib", ["builtin_sentiment_is_positive", "builtin_topic_which_topic"], "mean2")
      api.merge("/tmp/qs/lib", api.select_experts("/tmp/qs/lib", task="builtin_held_out"), "top2", top_k=2)
  """
  store = ExpertLibrary(_library_dir(library))
  if isinstance(experts, selection.Selection):
    if top_k is None:
      raise UserInputError("merge: a Selection needs top_k=K (a positive integer), as --ranking needs --top_k")
    names = experts.top(top_k)
  elif isinstance(experts, str):
    raise UserInputError(f"experts: expected a list of names or a Selection, got {experts!r}")
  else:
    names = list(experts)[:top_k] if top_k is not None else list(experts)
  if method == "weighted" and weights is None:
    raise UserInputError("merge: method='weighted' needs weights=[W, W, ...]")
  _start()
  return merge_and_add.merge_into_library(store, store.resolve(names), name, method, weights=weights, scale=scale,
                                   density=density, checkpoint=checkpoint, config=config)


# ---------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What `evaluate` returns: each task's TaskResult (`results`: metrics per expert, predictions
  per example) for the `experts`, and the same as tables (`rows`, `per_dataset`, `mean`,
  `markdown`)."""
  experts: tuple[str, ...]
  results: tuple[TaskResult, ...]

  @property
  def rows(self) -> list[dict[str, Any]]:
    """One row per (task, expert): {"task", "dataset", "prompt", "metric", "expert", "value",
    "examples"} with the task's primary metric (accuracy %, or ROUGE/BLEU). `pandas.DataFrame(rows)`
    makes a data frame of it."""
    return [{"task": r.task, "dataset": r.dataset, "prompt": r.prompt, "metric": r.primary, "expert": e,
             "value": r.metrics[e][r.primary], "examples": r.examples} for r in self.results for e in self.experts]

  def per_dataset(self) -> list[dict[str, Any]]:
    """One row per (dataset, expert): {"dataset", "expert", "mean", "median", "prompts"} over the
    dataset's prompts (the paper reports means, T0 medians)."""
    summary = expert_eval.summarize(self.results, self.experts)
    return [{"dataset": d, "expert": e, **summary[e][d]} for e in self.experts for d in summary[e]]

  def mean(self) -> dict[str, float]:
    """{expert: mean of the primary metric over every task}."""
    return {e: float(np.mean([r.metrics[e][r.primary] for r in self.results])) for e in self.experts}

  def markdown(self) -> str:
    """The table `eval` prints and writes to results.md."""
    return expert_eval.markdown_table(self.results, self.experts)


def evaluate(library, task: str, *, experts: str | Sequence[str] = "all", output_dir: Optional[str] = None,
             split: str = "validation", max_examples: Optional[int] = defaults.MAX_EXAMPLES,
             batch_size: int = defaults.BATCH_SIZE, max_input_length: int = defaults.MAX_INPUT_LENGTH,
             max_target_length: int = defaults.MAX_TARGET_LENGTH, beam_size: int = 1,
             expert_chunk: Optional[int] = None, mesh=None, unit_experts: Optional[int] = None,
             overwrite: bool = False, progress: bool = True, softmax_vocab_size: Optional[int] = None,
             checkpoint: Optional[str] = None, config: Optional[T5Config] = None, setup: Optional[str] = None,
             check_integrity: bool = True, routing: Optional[Sequence[str]] = None,
             routing_options: Optional[Mapping[str, Any]] = None) -> Evaluation:
  """`elm-jax eval`: every selected expert on every prompt of a task or mixture (rank
  classification where there are answer choices, else decoding and ROUGE/BLEU), as the
  resumable sweep: with `output_dir`, its units and reports (results.json, .csv, .md,
  predictions/) go there and a rerun skips the finished units (`unit_experts` experts a unit);
  without, a temporary directory is used and removed. `max_examples`: per task, None for all.
  Returns an Evaluation: `.rows` (list of dicts), `.per_dataset()`, `.mean()`, `.markdown()`.
  `routing` (method names of `route`): the selected experts routed together by each method, one
  column each ('routed:arrow'), instead of each expert alone; `routing_options`: `route`'s
  top_k, temperature, expert, embedder, text_format, neighbours.

      table = api.evaluate("/tmp/qs/lib", "builtin_held_out", max_examples=32)
      table.mean()                                      # {expert: mean accuracy %}
      api.evaluate("/tmp/qs/lib", "builtin_held_out", routing=["arrow"], routing_options={"top_k": 2})
  """
  _start()
  options = dict(library_dir=_library_dir(library), task=task, experts=experts, split=split,
                 max_examples=max_examples, softmax_vocab_size=softmax_vocab_size, batch_size=batch_size,
                 expert_chunk=expert_chunk, mesh_config=_mesh(mesh), unit_experts=unit_experts,
                 overwrite=overwrite, progress=progress, max_input_length=max_input_length,
                 max_target_length=max_target_length, beam_size=beam_size, checkpoint=checkpoint, setup=setup,
                 check_integrity=check_integrity, model_config=config, routing=routing,
                 routing_options=routing_options)
  if output_dir is None:
    with tempfile.TemporaryDirectory() as tmp:
      names, _, results = eval_command.run_sweep(os.path.join(tmp, "eval"), **options)
  else:
    names, _, results = eval_command.run_sweep(output_dir, **options)
  return Evaluation(tuple(names), tuple(results))
