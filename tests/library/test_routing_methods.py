"""Routing methods over a library's loaded experts (`library/routing_methods.py`): per-example
retrieval's votes, each example routed to its top-1 expert scoring as that expert, forced and
Arrow through `route`, and each refusal."""

import numpy as np
import pytest

from elm_jax.evaluation import expert_eval
from elm_jax.library import routing_methods
from tests.helpers.library import fake_loaded

NAMES = ["astronomy", "cooking", "law"]
KEYS = {"astronomy": ["The telescope observed a distant galaxy and two bright planets.",
                      "Astronomers measured the orbit of the comet around the sun."],
        "cooking": ["Stir the onions in butter until golden, then add the garlic.",
                    "Bake the bread dough for forty minutes in a hot oven."],
        "law": ["The court ruled that the contract was void under the statute.",
                "The defendant's lawyer appealed the judge's sentence."]}
ROWS = [{"inputs": "A distant galaxy seen by a telescope", "answer_choices": ["yes", "no"], "label": 0},
        {"inputs": "The court read the contract", "answer_choices": ["yes", "no", "maybe"], "label": 2},
        {"inputs": "Bake the onions in the oven", "answer_choices": ["true", "false"], "label": 1},
        {"inputs": "Astronomers watched the comet and the galaxy", "answer_choices": ["a", "b"], "label": 0}]
SCORING = dict(batch_size=4, max_input_length=32, max_target_length=8)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  return fake_loaded(tmp_path_factory.mktemp("routing"), NAMES, keys=KEYS)


@pytest.fixture(scope="module")
def one_pass(loaded):
  return expert_eval.score_instances(loaded, ROWS, **SCORING)[0]  # [E, N, C]


def test_retrieval_weights_are_the_vote_shares_of_the_nearest_keys(loaded):
  weights = routing_methods.retrieval_weights(loaded.library, NAMES, ROWS, embedder=None, text_format="instance",
                                              neighbours=1, top_k=1)
  np.testing.assert_array_equal(weights, [[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
  # The comet and galaxy row's 3 nearest keys (BM25 3.59, 3.19, 0.96): both astronomy keys, one law key.
  shares = routing_methods.retrieval_weights(loaded.library, NAMES, ROWS[3:], embedder=None, text_format="instance",
                                             neighbours=3, top_k=2)
  np.testing.assert_allclose(shares, [[2 / 3, 0, 1 / 3]], rtol=1e-6)
  top_1 = routing_methods.retrieval_weights(loaded.library, NAMES, ROWS[3:], embedder=None, text_format="instance",
                                            neighbours=3, top_k=1)
  np.testing.assert_array_equal(top_1, [[1, 0, 0]])


def test_each_example_routed_to_its_top_expert_scores_as_that_expert(loaded, one_pass):
  result = routing_methods.route(loaded, ROWS, "retrieval", embedder="bm25", text_format="instance",
                                 neighbours=1, **SCORING)
  finite = np.isfinite(result.scores)
  expected = one_pass[[0, 2, 1, 0], np.arange(4)]
  np.testing.assert_allclose(result.scores[finite], expected[finite], rtol=2e-6, atol=5e-5)
  assert result.computed_from["embedder"] == "bm25" and result.computed_from["neighbours"] == 1
  assert result.accuracy == pytest.approx(100.0 * np.mean(result.predictions == [0, 2, 1, 0]))


def test_forced_uniform_and_arrow_through_route(loaded, one_pass):
  forced = routing_methods.route(loaded, ROWS, "forced", expert="law", **SCORING)
  finite = np.isfinite(forced.scores)
  np.testing.assert_allclose(forced.scores[finite], one_pass[2][finite], rtol=2e-6, atol=5e-5)
  arrow = routing_methods.route(loaded, ROWS, "arrow", top_k=2, temperature=0.5, **SCORING)
  uniform = routing_methods.route(loaded, ROWS, "uniform", **SCORING)
  assert arrow.scores.shape == uniform.scores.shape == (4, 3)
  assert np.abs(arrow.scores[finite] - uniform.scores[finite]).max() > 1e-4
  assert arrow.computed_from["top_k"] == 2 and arrow.computed_from["temperature"] == 0.5


def test_refusals(loaded):
  with pytest.raises(routing_methods.RoutingMethodError, match="routing method 'best' is not known; the known "
                     "methods are uniform, arrow, phatgoose, retrieval, forced"):
    routing_methods.route(loaded, ROWS, "best")
  with pytest.raises(routing_methods.RoutingMethodError, match="method 'forced': name the expert"):
    routing_methods.route(loaded, ROWS, "forced")
  with pytest.raises(routing_methods.RoutingMethodError, match="no loaded expert named 'x'"):
    routing_methods.route(loaded, ROWS, "forced", expert="x")
  with pytest.raises(routing_methods.RoutingMethodError, match="method 'uniform': top_k: expected a positive integer"):
    routing_methods.route(loaded, ROWS, "uniform", top_k=0)
  with pytest.raises(routing_methods.RoutingMethodError, match="method 'retrieval' reads the retrieval keys"):
    routing_methods.route(loaded.__class__(loaded.model, loaded.backbone, loaded.stack, loaded.vocab_path), ROWS,
                          "retrieval", embedder="bm25")
