"""Selecting experts through one signature (`library/selection.py`): each method gives what its
ranking function gives on the same inputs (RoE on the library's keys; likelihood and oracle on
the scores of one pass of every expert), a new method is one more table entry, bad requests are
refused by name, and select-merge-evaluate gives the numbers of merging and evaluating by hand.

Four random adapter experts on a tiny T5 over the built-in vocabulary (scored and evaluated), in a
hand-built library of the same names whose keys are about four topics (retrieved)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax.evaluation import expert_eval
from elm_jax.expert_stack import ExpertsOnBackbone, ExpertStack
from elm_jax.library import merging, retrieval, selection
from elm_jax.library.loaded import LoadedExperts
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from tasks import builtin_registry, instances
from tests.helpers.library import make_expert

TASK = "builtin_nli_gpt3_style_score_eval"
NAMES = ["astronomy", "cooking", "football", "law"]
KEYS = {
    "astronomy": ["The telescope observed a distant galaxy and two bright planets.",
                  "Astronomers measured the orbit of the comet around the sun."],
    "cooking": ["Stir the onions in butter until golden, then add the garlic.",
                "Bake the bread dough for forty minutes in a hot oven."],
    "football": ["The striker scored a late goal and the team won the match.",
                 "The goalkeeper saved a penalty in the second half."],
    "law": ["The court ruled that the contract was void under the statute.",
            "The defendant's lawyer appealed the judge's sentence."],
}
TOPIC_QUERIES = ["A distant galaxy seen by a telescope", "The court read the contract",
                 "Astronomers watched the comet"]
EVALUATION = dict(max_examples=8, batch_size=8, max_input_length=64, max_target_length=16)
SCORING = dict(batch_size=8, max_input_length=64, max_target_length=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(library, its experts on a tiny backbone as LoadedExperts, the task's 8 labelled queries)."""
  builtin_registry.register_builtin_suite(num_train=40, num_eval=8)
  root = tmp_path_factory.mktemp("selection")
  library = ExpertLibrary(root / "lib", create=True)
  for i, name in enumerate(NAMES):
    library.add(make_expert(root / "src", name, i), keys=[{"inputs": t} for t in KEYS[name]])
  library.add(make_expert(root / "src", "keyless", 9))  # as a merged expert: no retrieval keys
  config = T5Config(vocab_size=builtin_registry.VOCAB_SIZE, emb_dim=32, num_heads=4, head_dim=8,
                    mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
  expert_config = ExpertConfig(kind="adapter", reduction_factor=4)
  trees = []
  for seed in range(len(NAMES)):
    full = nn.unbox(init_params(config, jax.random.PRNGKey(seed), expert=expert_config))
    backbone, expert = split_params(full, expert_config)
    trees.append(jax.tree_util.tree_map(lambda x, s=seed: np.asarray(x) + 0.5 * s, expert))
  loaded = LoadedExperts(EncoderDecoderModel.build(config, expert_config), backbone,
                         ExpertStack.from_trees(NAMES, trees, expert_config), builtin_registry.builtin_vocabulary(),
                         library=library)
  return library, loaded, instances.query_instances(TASK, 8, labelled=True)


@pytest.fixture(scope="module")
def scores(world):
  """[E, N, C] scores of the queries by every expert, as `elm-jax retrieve` computed them."""
  _, loaded, queries = world
  return expert_eval.score_instances(loaded, instances.strip_labels(queries), source=f"task {TASK}", **SCORING)[0]


def test_roe_is_the_retrieval_ranking_on_the_librarys_keyed_experts(world):
  library, loaded, _ = world
  queries = [{"inputs": q} for q in TOPIC_QUERIES]
  expected = retrieval.roe_ranking(library, NAMES, queries, bm25=True, text_format="instance")
  assert [r["expert"] for r in expected][:2] == ["astronomy", "law"]  # 2 votes, then 1
  # Every keyed expert of the library (not 'keyless'), or the loaded experts' own library.
  for candidates in (library, loaded):
    got = selection.select_experts("roe", candidates, queries=TOPIC_QUERIES, embedder="bm25",
                                   text_format="instance", source="topics")
    assert got.ranking() == expected
    assert got.score_name == "votes" and got.scores == (2, 1, 0, 0) and got.top(2) == ["astronomy", "law"]
    assert got.computed_from == {"candidates": 4, "queries": 3, "source": "topics", "embedder": "bm25",
                                 "text_format": "instance"}
  named = selection.select_experts("roe", library, names=["law", "cooking"], queries=TOPIC_QUERIES,
                                   embedder="bm25", text_format="instance")
  assert named.ranking() == retrieval.roe_ranking(library, ["law", "cooking"], [{"inputs": q} for q in TOPIC_QUERIES],
                                                  bm25=True, text_format="instance")


def test_roe_with_the_papers_embedder_by_name_or_object(world):
  library, _, _ = world
  minilm = retrieval.MiniLMTextEmbedder()
  queries = [{"inputs": q} for q in TOPIC_QUERIES]
  expected = retrieval.roe_ranking(library, NAMES, queries, embedder=minilm)
  assert expected[0] == {"expert": "astronomy", "votes": 2}
  for embedder in ("minilm", minilm):
    got = selection.select_experts("roe", library, queries=queries, embedder=embedder)
    assert got.ranking() == expected and got.computed_from["embedder"] == "minilm"
    assert got.computed_from["text_format"] == instances.DEFAULT_TEXT_FORMAT


def test_likelihood_ranks_by_the_mean_entropy_of_one_scoring_pass(world, scores):
  _, loaded, queries = world
  got = selection.select_experts("likelihood", loaded, queries=queries, scoring=SCORING, source=f"task {TASK}")
  assert got.ranking() == selection.likelihood_ranking(scores, NAMES, "entropy")  # the previous path
  # By hand: softmax over each query's choices, entropy, mean over queries; lowest first.
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1).mean(-1)
  assert len(set(np.round(entropy, 4))) == 4  # distinct: the order is the criterion's, not ties'
  assert list(got.experts) == [NAMES[e] for e in np.argsort(entropy)]
  np.testing.assert_allclose(got.scores, np.sort(entropy), rtol=1e-12)
  assert got.computed_from == {"candidates": 4, "queries": 8, "source": f"task {TASK}", "criterion": "entropy"}
  max_prob = selection.select_experts("likelihood", loaded, queries=queries, scores=scores, criterion="max_prob")
  assert max_prob.ranking() == selection.likelihood_ranking(scores, NAMES, "max_prob")
  with pytest.raises(selection.SelectionError, match="--criterion: expected one of"):
    selection.select_experts("likelihood", loaded, queries=queries, scores=scores, criterion="margin")


def test_oracle_ranks_by_accuracy_on_the_labels(world, scores):
  _, loaded, queries = world
  labels = [q["label"] for q in queries]
  got = selection.select_experts("oracle", loaded, queries=queries, scores=scores)
  assert got.ranking() == selection.oracle_ranking(scores, labels, NAMES)  # the previous path
  accuracy = 100 * (scores.argmax(-1) == np.array(labels)).mean(-1)
  assert sorted(got.scores, reverse=True) == list(got.scores) and sorted(got.scores) == sorted(accuracy)
  with pytest.raises(selection.SelectionError, match=f"task {TASK}: the oracle needs labelled instances"):
    selection.select_experts("oracle", loaded, queries=instances.strip_labels(queries), scores=scores,
                             source=f"task {TASK}")


def test_a_new_method_is_one_table_entry_and_unlabelled_methods_never_see_labels(world, monkeypatch):
  library, _, queries = world
  seen = []

  def first_name(request):
    seen.append(request)
    return [{"expert": n, "letter": n[0]} for n in sorted(request.names)], {"order": "alphabetical"}
  method = selection.SelectionMethod("alphabetical", "A-Z", "by name", reads="keys", labelled=False, rank=first_name)
  monkeypatch.setitem(selection.METHODS, "alphabetical", method)
  got = selection.select_experts("alphabetical", library, names=["law", "cooking"], queries=queries)
  assert got == selection.Selection("alphabetical", ("cooking", "law"), ("c", "l"), "letter",
                                    {"candidates": 2, "queries": 8, "source": "queries", "order": "alphabetical"})
  assert all(q["label"] is None and q["targets"] is None for q in seen[0].queries)
  assert [q["inputs"] for q in seen[0].queries] == [q["inputs"] for q in queries]
  monkeypatch.setitem(selection.METHODS, "alphabetical", dataclasses.replace(method, labelled=True))
  selection.select_experts("alphabetical", library, queries=queries)
  assert [q["label"] for q in seen[1].queries] == [q["label"] for q in queries]


def test_bad_requests_are_refused_by_name(world, scores):
  library, loaded, queries = world
  with pytest.raises(selection.SelectionError,
                     match="selection method 'routing' is not known; the known methods are roe, likelihood, oracle$"):
    selection.select_experts("routing", library, queries=queries)
  with pytest.raises(selection.SelectionError, match="method 'likelihood' scores the queries with every candidate"):
    selection.select_experts("likelihood", library, queries=queries)
  bare = ExpertsOnBackbone(loaded.model, loaded.backbone, loaded.stack, loaded.vocab_path)
  with pytest.raises(selection.SelectionError, match="method 'roe' reads the retrieval keys of a library"):
    selection.select_experts("roe", bare, queries=queries, embedder="bm25")
  with pytest.raises(selection.SelectionError,
                     match=r"scores: expected \[4 experts, 8 queries, choices\], got \[4, 7, "):
    selection.select_experts("oracle", loaded, queries=queries, scores=scores[:, :7])
  with pytest.raises(selection.SelectionError, match="names: the candidates are the loaded experts"):
    selection.select_experts("roe", loaded, names=["law"], queries=queries, embedder="bm25")
  with pytest.raises(selection.SelectionError, match="queries: expected a non-empty list"):
    selection.select_experts("roe", library, queries=[], embedder="bm25")
  with pytest.raises(selection.SelectionError, match=r"queries\[1\]: expected an input string or a dict"):
    selection.select_experts("roe", library, queries=["fine", {"text": "no inputs"}], embedder="bm25")
  with pytest.raises(selection.SelectionError, match="embedder: expected one of"):
    selection.select_experts("roe", library, queries=queries, embedder="tfidf")
  with pytest.raises(selection.SelectionError, match="top k: expected a positive integer, got 0"):
    selection.select_experts("roe", library, queries=queries, embedder="bm25").top(0)


def test_select_merge_evaluate_is_merging_and_evaluating_each_selection_by_hand(world, scores):
  _, loaded, queries = world
  methods = ("roe", "likelihood", "oracle")
  got = selection.select_merge_evaluate(methods, loaded, TASK, queries=queries, top_k=2, embedder="bm25",
                                        scoring=SCORING, evaluation=EVALUATION)
  assert [m.selection.method for m in got] == list(methods)
  expected = [selection.select_experts(m, loaded, queries=queries, scores=scores, embedder="bm25") for m in methods]
  assert [m.selection for m in got] == expected
  assert [m.members for m in got] == [tuple(s.experts[:2]) for s in expected]
  # By hand: the uniform mean of each top-2, all three evaluated in one pass.
  trees = [merging.merge_uniform([loaded.stack.tree(n) for n in s.experts[:2]]) for s in expected]
  by_hand = expert_eval.evaluate_task(loaded.with_stack(ExpertStack.from_trees(["x", "y", "z"], trees,
                                                                               loaded.stack.expert_config)),
                                      TASK, **EVALUATION)
  assert {m.metric for m in got} == {by_hand.primary} == {"accuracy"}
  assert [m.score for m in got] == [by_hand.metrics[n]["accuracy"] for n in ("x", "y", "z")]
