"""Routing the library's experts on a task, by method: beyond choosing whole experts per task
(`library/selection.py`), the loaded experts are mixed per token or per example inside one
compiled pass (`models/routing.py`, `evaluation/routed_scoring.py`).

    result = route(experts, rows, "arrow", top_k=2)    # experts: library.loaded.load_experts(...)
    result.accuracy, result.scores                     # % on labelled rows; [N, C] choice scores

`METHODS` (one entry a method):

- 'uniform': w_e = 1 / E everywhere, routing's counterpart of merging all experts uniformly;
- 'arrow' (Ostapenko et al. 2024): per token and per routed module, each expert's prototype
  (LoRA: the update's top input-side singular vector; adapters: the down-projection's top left
  singular vector; see each kind's module) scores |<x, p_e>|; IA3 experts are refused;
- 'retrieval': RoE at the granularity of one example: each input's `neighbours` nearest
  retrieval keys in the library (the same keys, embedders and text format as 'roe') vote for
  their experts; the example's weights are the vote shares of its top_k experts, the same for
  all its tokens and modules;
- 'phatgoose' (Muqeeth et al. 2024): per token and per routed module, each expert's trained
  gate g_e (`library/gates.py`: `elm-jax train-gates`) scores <standardise(x), standardise(g_e)>
  (both standardised over features, as the paper does); experts without gates are refused;
- 'forced': every example routed to one named expert (top-1, forced): that expert's scores.

Per-token methods keep `top_k` experts a token with softmax(score / `temperature`) weights;
layer-norm scales the experts train are mixed with the example weights (uniform for them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from elm_jax import defaults
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval, generation_metrics, routed_scoring
from elm_jax.evaluation.expert_eval import TaskResult
from elm_jax.expert_stack import ExpertsOnBackbone
from elm_jax.library import gates, retrieval, selection
from elm_jax.models import routing
from elm_jax.models.routing import RoutingInputs
from tasks import instances

NEIGHBOURS = 8  # retrieval keys each input's vote takes ('retrieval')
# The options of `route` that methods read, with their defaults (`elm-jax route`'s flags).
OPTION_DEFAULTS = {"top_k": 1, "temperature": 1.0, "expert": None, "embedder": "minilm",
                   "text_format": instances.DEFAULT_TEXT_FORMAT, "neighbours": NEIGHBOURS}


class RoutingMethodError(UserInputError):
  """A routing request the method or the experts cannot answer."""


@dataclasses.dataclass(frozen=True)
class RoutingRequest:
  """What a method builds its routing from: the experts on their backbone (with the library they
  came from, or None), the instances routed, and the options."""
  experts: ExpertsOnBackbone
  rows: list[dict[str, Any]]
  top_k: int
  expert: Optional[str]
  embedder: Any
  text_format: str
  neighbours: int


@dataclasses.dataclass(frozen=True)
class RoutingMethod:
  """One way to route: `per_token` (weights per token and module) or per example; `build`:
  request -> (RoutingInputs, the options it read)."""
  name: str
  description: str
  per_token: bool
  build: Callable[[RoutingRequest], tuple[RoutingInputs, dict[str, Any]]]


def _uniform(request: RoutingRequest):
  return RoutingInputs(routing.uniform_weights(len(request.rows), len(request.experts.names))), {}


def _forced(request: RoutingRequest):
  if request.expert is None:
    raise RoutingMethodError("method 'forced': name the expert every example is routed to (expert=NAME)")
  names = request.experts.names
  if request.expert not in names:
    raise RoutingMethodError(f"method 'forced': no loaded expert named {request.expert!r} "
                             f"(loaded: {', '.join(names[:10])})")
  return (RoutingInputs(routing.forced_weights(len(request.rows), len(names), names.index(request.expert))),
          {"expert": request.expert})


def _arrow(request: RoutingRequest):
  stack = request.experts.stack
  try:
    routers = routing.arrow_routers(stack.expert_config, stack.params)
  except routing.RoutingError as e:
    raise RoutingMethodError(f"method 'arrow': {e}") from None
  return RoutingInputs(routing.uniform_weights(len(request.rows), len(stack)), routers), {}


def _library(request: RoutingRequest, method: str, reads: str):
  """The library the experts were loaded from, which `method` reads `reads` from."""
  library = getattr(request.experts, "library", None)
  if library is None:
    raise RoutingMethodError(f"method {method!r} reads {reads}: pass experts loaded from one "
                             "(library.loaded.load_experts)")
  return library


def _phatgoose(request: RoutingRequest):
  library = _library(request, "phatgoose", "the experts' gates from their library")
  names = list(request.experts.names)
  found = {name: gates.load_gates(library, name) for name in names}
  missing = [name for name, g in found.items() if g is None]
  if missing:
    raise RoutingMethodError(f"method 'phatgoose': expert(s) without gates: {', '.join(missing)}; train them "
                             f"with `elm-jax train-gates --library={library.root} --model_dir=DIR` "
                             "(elm_jax.api.train_gates)")
  try:
    routers = routing.gate_routers([found[name] for name in names])
  except routing.RoutingError as e:
    raise RoutingMethodError(f"method 'phatgoose': {e}") from None
  return RoutingInputs(routing.uniform_weights(len(request.rows), len(names)), routers), {}


def _retrieval(request: RoutingRequest):
  library = _library(request, "retrieval", "the retrieval keys of a library")
  if isinstance(request.neighbours, bool) or not isinstance(request.neighbours, int) or request.neighbours < 1:
    raise RoutingMethodError(f"neighbours: expected a positive integer, got {request.neighbours!r}")
  names = list(request.experts.names)
  name, embedder = selection.resolve_embedder(request.embedder, library)
  weights = retrieval_weights(library, names, request.rows, embedder=embedder, text_format=request.text_format,
                              neighbours=request.neighbours, top_k=request.top_k)
  return RoutingInputs(weights), {"embedder": name, "text_format": request.text_format,
                                  "neighbours": request.neighbours}


def retrieval_weights(library, names: Sequence[str], rows: Sequence[dict[str, Any]], *, embedder,
                      text_format: str = instances.DEFAULT_TEXT_FORMAT, neighbours: int = NEIGHBOURS,
                      top_k: int = 1) -> np.ndarray:
  """[N, E] per-example weights: each row's `neighbours` nearest keys of the named experts (cosine
  of `embedder`'s embeddings, or BM25 when `embedder` is None) vote for their experts; the row's
  `top_k` experts by votes (ties: the expert of the nearer key first) share its weight in
  proportion to their votes."""
  query_texts = [instances.format_text(r, text_format) for r in rows]
  if embedder is None:
    key_texts, owners = retrieval.library_keys(library, names, text_format)
    index = retrieval.BM25(key_texts)
    similarity = np.stack([index.scores(q) for q in query_texts])
  else:
    keys, owners = retrieval.key_embeddings(library, names, embedder, text_format)
    similarity = embedder.embed(query_texts, retrieval.QUERY_MAX_LENGTH) @ keys.T
  nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :neighbours]  # [N, neighbours]
  weights = np.zeros((len(rows), len(names)), np.float32)
  for n, keys_of_row in enumerate(nearest):
    voters = owners[keys_of_row]
    votes = np.bincount(voters, minlength=len(names))
    first = {int(e): r for r, e in reversed(list(enumerate(voters)))}
    order = sorted(first, key=lambda e: (-votes[e], first[e]))[:top_k]
    total = sum(votes[e] for e in order)
    for e in order:
      weights[n, e] = votes[e] / total
  return weights


METHODS: dict[str, RoutingMethod] = {m.name: m for m in (
    RoutingMethod("uniform", "every expert's output with weight 1/E", False, _uniform),
    RoutingMethod("arrow", "per token and module: top-k experts by |<x, prototype>| (Arrow)", True, _arrow),
    RoutingMethod("phatgoose", "per token and module: top-k experts by their trained gates (PHATGOOSE)", True,
                  _phatgoose),
    RoutingMethod("retrieval", "per example: its nearest retrieval keys vote for experts", False, _retrieval),
    RoutingMethod("forced", "every example routed to one named expert", False, _forced),
)}


@dataclasses.dataclass(frozen=True)
class RoutedResult:
  """A method's routed outputs on N instances, and what they were computed from (experts,
  top_k, temperature and the method's options). Rank classification (every instance has answer
  choices): `scores` [N, C] (-inf on padded choices), `predictions` [N] (argmax), `accuracy`
  (%; None without labels). Generation (instances without answer choices): `scores` None,
  `predictions` the decoded texts, `accuracy` None. `metrics`: the task's metrics (%) where
  every instance has its reference ({'accuracy'}; ROUGE-1/2/L, BLEU, exact match), else {}."""
  method: str
  experts: tuple[str, ...]
  scores: Optional[np.ndarray]
  predictions: Any
  accuracy: Optional[float]
  computed_from: dict[str, Any]
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def ranked(self) -> bool:
    return self.scores is not None


def routing_method(name: str) -> RoutingMethod:
  """The registered method `name`; an unknown name is an error listing the known ones."""
  if name not in METHODS:
    raise RoutingMethodError(f"routing method {name!r} is not known; the known methods are {', '.join(METHODS)}")
  return METHODS[name]


def route(experts: ExpertsOnBackbone, rows: Sequence[dict[str, Any]], method: str, *, top_k: int = 1,
          temperature: float = 1.0, expert: Optional[str] = None, embedder: Any = "minilm",
          text_format: str = instances.DEFAULT_TEXT_FORMAT, neighbours: int = NEIGHBOURS,
          batch_size: int = defaults.BATCH_SIZE, partitioner=None,
          max_input_length: int = defaults.MAX_INPUT_LENGTH, max_target_length: int = defaults.MAX_TARGET_LENGTH,
          beam_size: int = 1, source: str = "instances") -> RoutedResult:
  """The loaded experts routed by `method` (a name in METHODS) on `rows` (instance dicts) in one
  compiled pass per batch shape: rank classification when every row has answer choices (a label
  each for the accuracy), else decoding (`max_target_length` tokens, greedy or `beam_size`
  beams; a `targets` text each for ROUGE/BLEU). Options, each read by its method: `top_k`
  (experts kept per token, or per example for 'retrieval'), `temperature` (per-token softmax),
  `expert` ('forced'), `embedder`, `text_format`, `neighbours` ('retrieval'). Labels and
  targets are never read by a method, only by the metrics."""
  chosen = routing_method(method)
  try:
    routing.RoutedExperts.over(experts.stack.expert_config, top_k, temperature)  # the kinds, top_k, temperature
  except routing.RoutingError as e:
    raise RoutingMethodError(f"method {method!r}: {e}") from None
  rows = list(rows)
  if not rows:
    raise RoutingMethodError(f"{source}: no instances to route")
  unlabelled = [{**r, "label": None, "targets": None} for r in rows]
  request = RoutingRequest(experts, unlabelled, top_k, expert, embedder, text_format, neighbours)
  inputs, options = chosen.build(request)
  computed_from = {"experts": len(experts.names), "instances": len(rows), "top_k": top_k,
                   "temperature": temperature, "source": source, **options}
  scoring = dict(top_k=top_k, temperature=temperature, batch_size=batch_size, partitioner=partitioner,
                 max_input_length=max_input_length)
  if not all(r.get("answer_choices") for r in rows):
    texts = routed_scoring.decode_routed_instances(experts, rows, inputs, max_decode_length=max_target_length,
                                                   beam_size=beam_size, **scoring)
    references = [r.get("targets") for r in rows]
    metrics = ({} if any(t is None for t in references)
               else generation_metrics.generation_metrics(texts, references))
    return RoutedResult(method, tuple(experts.names), None, texts, None, {**computed_from, "beam_size": beam_size},
                        metrics)
  scores, _ = routed_scoring.score_routed_instances(experts, rows, inputs, max_target_length=max_target_length,
                                                    source=source, **scoring)
  predictions = np.argmax(scores, axis=-1)
  labels = [r.get("label") for r in rows]
  accuracy = (None if any(label is None for label in labels)
              else float(100.0 * np.mean(predictions == np.asarray(labels))))
  return RoutedResult(method, tuple(experts.names), scores, predictions, accuracy, computed_from,
                      {} if accuracy is None else {"accuracy": accuracy})


def column_name(method: str) -> str:
  """The name a routed method's results take beside the experts' own in `eval`'s reports."""
  return f"routed:{method}"


def routed_task_result(experts: ExpertsOnBackbone, task: str, rows: Sequence[dict[str, Any]], method: str,
                       **options) -> TaskResult:
  """`eval`'s result for `method` routing the experts on a task's rows (labelled or with
  targets, `expert_eval.read_task_rows`): one column, `column_name(method)`, as every expert
  has in `expert_eval.evaluate_tasks`'s results. `options`: `route`'s."""
  result = route(experts, rows, method, source=f"task {task}", **options)
  dataset, prompt = expert_eval.dataset_and_prompt(task)
  column = column_name(method)
  if result.ranked:
    predictions = [{"index": n, "label": int(r["label"]), "predictions": {column: int(result.predictions[n])}}
                   for n, r in enumerate(rows)]
    evaluation = "rank"
  else:
    predictions = [{"index": n, "target": r["targets"], "predictions": {column: result.predictions[n]}}
                   for n, r in enumerate(rows)]
    evaluation = "generation"
  return TaskResult(task, dataset, prompt, evaluation, len(rows), {column: result.metrics}, predictions)
