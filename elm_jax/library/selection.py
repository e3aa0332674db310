"""Selecting experts for a task: every method behind one signature, and select-merge-evaluate.

    chosen = select_experts("roe", library, queries=rows)     # or experts from load_experts
    chosen.top(3)                                              # expert names, best first

`select_experts(method, candidates, queries=...)` ranks every candidate expert for the task the
queries come from (a handful of its inputs: instance dicts {"inputs", "answer_choices"?,
"label"?}, or plain input strings) and returns a `Selection`. The methods are the entries of
`METHODS`; a new method is one more entry:

- 'roe', Retrieval of Experts (`library/retrieval.py`): each query's nearest stored training
  instance (a retrieval key) votes for its expert; experts ranked by votes. Reads the library's
  keys only: no backbone is loaded.
- 'likelihood': every candidate scores the queries' answer choices in one pass
  (`expert_eval.score_instances`, scores [E, N, C]); experts ranked by a label-free criterion of
  their choice distributions: lowest mean entropy ('entropy'), or highest mean max-probability
  ('max_prob').
- 'oracle': the same scores, ranked by rank-classification accuracy on labelled queries: an
  upper bound, for analysis.

A method that is not labelled never sees the queries' labels (they are dropped before it runs).

`select_merge_evaluate` is the paper's recipe for an unseen task: select experts by one or more
methods, merge each selection's top k (`library/merging.py`) and evaluate the merged experts on
the task, all of them in one pass. The demo's retrieval stage runs it; a notebook can too.

Selecting experts picks whole library experts for a task before it is run. It is not the
Mixture-of-Experts router (`models/moe.py`), which sends each token to one of a layer's
feed-forward experts inside a single model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval
from elm_jax.expert_stack import ExpertsOnBackbone, ExpertStack
from elm_jax.library import merging, retrieval
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.t5_config import T5Config
from tasks import instances

CRITERIA = ("entropy", "max_prob")


class SelectionError(UserInputError):
  """A selection the candidates or queries cannot answer (unknown method, no labels, no keys)."""


@dataclasses.dataclass(frozen=True)
class Selection:
  """Every candidate expert ranked by one method, best first: `experts[i]` with its score
  `scores[i]` under `score_name` ('votes', 'entropy', 'max_prob' or 'accuracy');
  `computed_from` says what the ranking read (the number of candidates and queries, where the
  queries came from, and the method's options: embedder and text format, or criterion)."""
  method: str
  experts: tuple[str, ...]
  scores: tuple[Any, ...]
  score_name: str
  computed_from: Mapping[str, Any]

  def top(self, k: int) -> list[str]:
    """The `k` best experts (all of them when there are fewer)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise SelectionError(f"top k: expected a positive integer, got {k!r}")
    return list(self.experts[:k])

  def ranking(self) -> list[dict[str, Any]]:
    """[{"expert": name, score_name: score}] best first: what `elm-jax retrieve --output` writes."""
    return [{"expert": e, self.score_name: s} for e, s in zip(self.experts, self.scores)]


@dataclasses.dataclass(frozen=True)
class SelectionRequest:
  """What a method ranks from: the candidates' names (in library or stack order), their library
  and experts on a backbone (each None where the caller gave none), the queries (labels dropped
  for a method that is not labelled), the candidates' choice scores on them [E, N, C] (for a
  method that reads scores) and the methods' options."""
  names: tuple[str, ...]
  library: Optional[ExpertLibrary]
  experts: Optional[ExpertsOnBackbone]
  queries: list[dict[str, Any]]
  scores: Optional[np.ndarray]
  source: str
  embedder: Any
  text_format: str
  criterion: str
  checkpoint: Optional[str]
  model_config: Optional[T5Config]


@dataclasses.dataclass(frozen=True)
class SelectionMethod:
  """One way to choose experts. `reads`: 'keys' (the library's retrieval keys; nothing is
  loaded) or 'scores' (every candidate's choice scores on the queries, which needs the experts
  on their backbone); `labelled`: whether it reads the queries' labels; `rank`: request ->
  (ranking [{"expert", score_name: score}] best first, the options it read)."""
  name: str
  title: str
  description: str
  reads: str
  labelled: bool
  rank: Callable[[SelectionRequest], tuple[list[dict[str, Any]], dict[str, Any]]]


# ---------------------------------------------------------------------------- the methods
def choice_probabilities(scores: np.ndarray) -> np.ndarray:
  """[E, N, C] log-likelihoods (-inf on padded choices) -> softmax over choices."""
  shifted = scores - np.max(scores, axis=-1, keepdims=True)
  p = np.exp(shifted)
  return p / p.sum(-1, keepdims=True)


def likelihood_ranking(scores: np.ndarray, names: Sequence[str], criterion: str = "entropy"
                       ) -> list[dict[str, Any]]:
  """Experts ranked by a label-free criterion over their choice distributions [E, N, C]:
  'entropy' (mean entropy, lowest first) or 'max_prob' (mean max-probability, highest first);
  ties go to the earlier expert."""
  p = choice_probabilities(scores)
  if criterion == "entropy":
    value = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1).mean(-1)
    order = sorted(range(len(names)), key=lambda e: (value[e], e))
  elif criterion == "max_prob":
    value = p.max(-1).mean(-1)
    order = sorted(range(len(names)), key=lambda e: (-value[e], e))
  else:
    raise SelectionError(f"--criterion: expected one of {CRITERIA}, got {criterion!r}")
  return [{"expert": names[e], criterion: float(value[e])} for e in order]


def oracle_ranking(scores: np.ndarray, labels: Sequence[int], names: Sequence[str]) -> list[dict[str, Any]]:
  """Experts ranked by rank-classification accuracy (%) on labelled examples: scores [E, N, C],
  labels [N]; ties go to the earlier expert."""
  predictions = np.argmax(scores, axis=-1)
  accuracy = 100.0 * (predictions == np.asarray(labels)[None, :]).mean(-1)
  order = sorted(range(len(names)), key=lambda e: (-accuracy[e], e))
  return [{"expert": names[e], "accuracy": float(accuracy[e])} for e in order]


def resolve_embedder(embedder: Any, library: ExpertLibrary, checkpoint: Optional[str] = None,
                     model_config: Optional[T5Config] = None) -> tuple[str, Any]:
  """(name, embedder object; None for 'bm25') of `embedder`: 'minilm', 't5' (the library's
  backbone encoder, or `checkpoint` with `model_config`), 'bm25', or an object with `name` and
  `embed(texts, max_length)`. What 'roe' and per-example retrieval routing read keys with."""
  if not isinstance(embedder, str):
    return embedder.name, embedder
  if embedder not in retrieval.EMBEDDERS:
    raise SelectionError(f"embedder: expected one of {retrieval.EMBEDDERS} or an embedder object, "
                         f"got {embedder!r}")
  if embedder == "minilm":
    return embedder, retrieval.MiniLMTextEmbedder()
  if embedder == "t5":
    return embedder, retrieval.backbone_embedder(library, checkpoint, model_config)
  return embedder, None


def _roe(request: SelectionRequest):
  if request.library is None:
    raise SelectionError("method 'roe' reads the retrieval keys of a library: pass an ExpertLibrary, "
                         "or experts loaded from one (library.loaded.load_experts)")
  name, embedder = resolve_embedder(request.embedder, request.library, request.checkpoint, request.model_config)
  ranking = retrieval.roe_ranking(request.library, request.names, request.queries,
                                  embedder=None if name == "bm25" else embedder, bm25=name == "bm25",
                                  text_format=request.text_format)
  return ranking, {"embedder": name, "text_format": request.text_format}


def _likelihood(request: SelectionRequest):
  return likelihood_ranking(request.scores, request.names, request.criterion), {"criterion": request.criterion}


def _oracle(request: SelectionRequest):
  labels = [q.get("label") for q in request.queries]
  if any(label is None for label in labels):
    raise SelectionError(f"{request.source}: the oracle needs labelled instances")
  return oracle_ranking(request.scores, labels, request.names), {}


METHODS: dict[str, SelectionMethod] = {m.name: m for m in (
    SelectionMethod("roe", "RoE", "Retrieval of Experts: each query's nearest training instance (a "
                    "retrieval key) votes for its expert", reads="keys", labelled=False, rank=_roe),
    SelectionMethod("likelihood", "likelihood", "every expert scores the queries' answer choices in one "
                    "pass; ranked by a label-free criterion of its choice distributions",
                    reads="scores", labelled=False, rank=_likelihood),
    SelectionMethod("oracle", "oracle", "ranked by accuracy on the labelled queries (an upper bound, for "
                    "analysis)", reads="scores", labelled=True, rank=_oracle),
)}


def selection_method(name: str) -> SelectionMethod:
  """The registered method `name`; an unknown name is an error listing the known ones."""
  if name not in METHODS:
    raise SelectionError(f"selection method {name!r} is not known; the known methods are "
                         f"{', '.join(METHODS)}")
  return METHODS[name]


# ---------------------------------------------------------------------------- one signature
def _query_rows(queries: Sequence[dict[str, Any] | str], labelled: bool) -> list[dict[str, Any]]:
  """Queries as instance dicts (a string is an input without choices), labels dropped unless
  `labelled`."""
  if isinstance(queries, (str, dict)) or not queries:
    raise SelectionError(f"queries: expected a non-empty list of instances or input strings, got {queries!r:.80}")
  rows = []
  for i, q in enumerate(queries):
    if isinstance(q, str):
      q = {"inputs": q}
    elif not isinstance(q, dict) or not isinstance(q.get("inputs"), str):
      raise SelectionError(f"queries[{i}]: expected an input string or a dict with an 'inputs' "
                           f"string, got {q!r:.80}")
    rows.append(q if labelled else {**q, "label": None, "targets": None})
  return rows


def score_queries(experts: ExpertsOnBackbone, queries: Sequence[dict[str, Any] | str], *,
                  scoring: Optional[Mapping[str, Any]] = None, source: str = "queries") -> np.ndarray:
  """Every expert's log-likelihood of each query's answer choices, in one pass: [E, N, C] with
  -inf on padded choices (`expert_eval.score_instances`; `scoring`: its keyword arguments such as
  batch_size, expert_chunk, partitioner, max_input_length, max_target_length)."""
  rows = _query_rows(queries, labelled=False)
  scores, _ = expert_eval.score_instances(experts, rows, source=source, **dict(scoring or {}))
  return scores


def select_experts(method: str, candidates: ExpertLibrary | ExpertsOnBackbone, *,
                   queries: Sequence[dict[str, Any] | str], names: Optional[Sequence[str]] = None,
                   embedder: Any = "minilm", text_format: str = instances.DEFAULT_TEXT_FORMAT,
                   criterion: str = "entropy", scores: Optional[np.ndarray] = None,
                   scoring: Optional[Mapping[str, Any]] = None, checkpoint: Optional[str] = None,
                   model_config: Optional[T5Config] = None, source: str = "queries") -> Selection:
  """Every candidate ranked by `method` (a name in METHODS) for the task `queries` come from.

  candidates: an ExpertLibrary (its experts named in `names`; by default every expert with
  retrieval keys) for a method that reads keys, or experts on their backbone (`load_experts`;
  all of them, `names` not given) for any method. Options, each read by one method:
  `embedder` ('roe': 'minilm', 't5' (the library's backbone encoder, or `checkpoint` with
  `model_config`), 'bm25', or an object with `name` and `embed(texts, max_length)`) and
  `text_format`; `criterion` ('likelihood': one of CRITERIA). A method that reads scores uses
  `scores` [E, N, C] of these candidates on these queries when given (so several methods share
  one scoring pass), else computes them with `score_queries(..., scoring=scoring)`. `source`
  names the queries in errors ("task NAME")."""
  chosen = selection_method(method)
  rows = _query_rows(queries, chosen.labelled)
  if isinstance(candidates, ExpertLibrary):
    library, experts = candidates, None
    if names is None:  # merged experts, and any added with --keys=none, have no keys
      names = [n for n in library.names() if library.entry(n).get("keys")]
    else:
      names = library.resolve(list(names))
  elif isinstance(candidates, ExpertsOnBackbone):
    if names is not None:
      raise SelectionError("names: the candidates are the loaded experts; load only the experts "
                           "to select from (load_experts(library, names))")
    library, experts, names = getattr(candidates, "library", None), candidates, list(candidates.names)
  else:
    raise SelectionError(f"candidates: expected an ExpertLibrary or experts on a backbone "
                         f"(library.loaded.load_experts), got {type(candidates).__name__}")
  if not names:
    raise SelectionError(f"{getattr(library, 'root', 'candidates')}: no candidate experts to select from")
  if chosen.reads == "scores":
    if experts is None:
      raise SelectionError(f"method {method!r} scores the queries with every candidate: pass the "
                           "experts on their backbone (library.loaded.load_experts), not a library")
    if scores is None:
      scores = score_queries(experts, rows, scoring=scoring, source=source)
    elif np.shape(scores)[:2] != (len(names), len(rows)):
      raise SelectionError(f"scores: expected [{len(names)} experts, {len(rows)} queries, choices], "
                           f"got {list(np.shape(scores))}")
  request = SelectionRequest(tuple(names), library, experts, rows, scores, source, embedder, text_format,
                             criterion, checkpoint, model_config)
  ranking, options = chosen.rank(request)
  score_name = next(k for k in ranking[0] if k != "expert")
  return Selection(method=method, experts=tuple(r["expert"] for r in ranking),
                   scores=tuple(r[score_name] for r in ranking), score_name=score_name,
                   computed_from={"candidates": len(names), "queries": len(rows), "source": source, **options})


# ---------------------------------------------------------------------------- select, merge, evaluate
@dataclasses.dataclass(frozen=True)
class MergedSelection:
  """A selection, the experts merged from it (its top k) and the merged expert's `metric` (the
  task's primary metric) on the task."""
  selection: Selection
  members: tuple[str, ...]
  metric: str
  score: float


def evaluate_trees(experts: ExpertsOnBackbone, trees: Sequence[Mapping], task: str,
                   **evaluation: Any) -> tuple[str, list[float]]:
  """(the task's primary metric, its value for each expert tree) on `task`, the trees (of the
  configuration of `experts`, on its backbone) evaluated in one pass; `evaluation`: keyword
  arguments of `expert_eval.evaluate_task` (max_examples, batch_size, max_input_length, ...)."""
  names = [f"m{i}" for i in range(len(trees))]
  on_backbone = experts.with_stack(ExpertStack.from_trees(names, list(trees), experts.stack.expert_config))
  result = expert_eval.evaluate_task(on_backbone, task, **evaluation)
  return result.primary, [result.metrics[n][result.primary] for n in names]


def select_merge_evaluate(methods: Sequence[str], experts: ExpertsOnBackbone, task: str, *,
                          queries: Sequence[dict[str, Any] | str], top_k: int,
                          merge: Callable[[ExpertStack], Mapping] = merging.merge_uniform,
                          evaluation: Optional[Mapping[str, Any]] = None, scoring: Optional[Mapping[str, Any]] = None,
                          **options: Any) -> list[MergedSelection]:
  """For each of `methods`, in order: its selection among `experts` (loaded from a library when a
  method reads keys) from `queries`, the `merge` (default: the paper's uniform mean) of its
  `top_k`, and that merged expert's primary metric on `task`. The candidates score the queries
  once for every method that reads scores, and the merged experts are evaluated in one pass.
  `scoring`: as `score_queries`; `evaluation`: keyword arguments of `expert_eval.evaluate_task`;
  `options`: the other keyword arguments of `select_experts` (embedder, criterion, source, ...)."""
  chosen = [selection_method(m) for m in methods]
  scores = None
  if any(m.reads == "scores" for m in chosen):
    scores = score_queries(experts, queries, scoring=scoring, source=options.get("source", "queries"))
  selections = [select_experts(m.name, experts, queries=queries, scores=scores, **options) for m in chosen]
  members = [s.top(top_k) for s in selections]
  trees = [merge(experts.stack.select(top)) for top in members]
  metric, values = evaluate_trees(experts, trees, task, **dict(evaluation or {}))
  return [MergedSelection(s, tuple(top), metric, value) for s, top, value in zip(selections, members, values)]
