"""Retrieval of Experts on a hand-built library: the planted expert wins; rankings are deterministic."""

import hashlib

import numpy as np
import pytest

from elm_jax.library import retrieval, selection
from tasks import instances
from elm_jax.library.store import ExpertLibrary
from tests.helpers.library import make_expert

TOPICS = {
    "astronomy": ["The telescope observed a distant galaxy and two bright planets.",
                  "Astronomers measured the orbit of the comet around the sun.",
                  "The star collapsed into a black hole at the centre of the nebula."],
    "cooking": ["Stir the onions in butter until golden, then add the garlic.",
                "Bake the bread dough for forty minutes in a hot oven.",
                "Season the soup with salt, pepper and fresh basil."],
    "football": ["The striker scored a late goal and the team won the match.",
                 "The goalkeeper saved a penalty in the second half.",
                 "The coach changed the formation before the final whistle."],
    "law": ["The court ruled that the contract was void under the statute.",
            "The defendant's lawyer appealed the judge's sentence.",
            "The plaintiff filed a lawsuit for breach of the agreement."],
}
CHOICES = {"astronomy": ["true", "false"], "cooking": ["tasty", "bland"], "football": ["win", "loss"],
           "law": ["guilty", "innocent"]}
QUERIES = [{"inputs": t, "answer_choices": ["true", "false"]} for t in (
    "A new planet was found orbiting a faint star by the space telescope.",
    "The galaxy's spiral arms were photographed by astronomers.",
    "Is the moon closer to the earth than the sun?")]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  root = tmp_path_factory.mktemp("retrieval")
  lib = ExpertLibrary(root / "lib", create=True)
  for i, (topic, texts) in enumerate(TOPICS.items()):
    keys = [{"inputs": t, "answer_choices": CHOICES[topic]} for t in texts]
    lib.add(make_expert(root / "src", f"{topic}_expert", i), keys=keys)
  return lib


@pytest.fixture(scope="module")
def minilm():
  return retrieval.MiniLMTextEmbedder()


@pytest.mark.parametrize("text_format", ["instance", "label_instance"])
def test_minilm_roe_picks_the_planted_expert(library, minilm, text_format):
  ranking = retrieval.roe_ranking(library, library.names(), QUERIES, embedder=minilm,
                                  text_format=text_format)
  assert ranking[0] == {"expert": "astronomy_expert", "votes": 3}
  assert sum(r["votes"] for r in ranking) == len(QUERIES)
  assert [r["expert"] for r in ranking[1:]] == ["cooking_expert", "football_expert", "law_expert"]


def test_bm25_roe_picks_the_planted_expert(library):
  queries = [{"inputs": "the judge and the court read the contract", "answer_choices": ["a", "b"]},
             {"inputs": "the defendant's lawyer spoke to the court", "answer_choices": ["a", "b"]}]
  ranking = retrieval.roe_ranking(library, library.names(), queries, bm25=True, text_format="instance")
  assert ranking[0] == {"expert": "law_expert", "votes": 2}


def test_key_embeddings_are_cached_and_untouched_by_new_experts(library, minilm, tmp_path):
  names = library.names()
  first, owners = retrieval.key_embeddings(library, names, minilm, "label_instance")
  assert first.shape == (12, 384) and owners.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)  # unit rows: ulps
  digests = {n: hashlib.sha256(library.embeddings_path(n, "minilm", "label_instance").read_bytes()).hexdigest()
             for n in names}
  library.add(make_expert(tmp_path, "weather_expert", 9),
              keys=[{"inputs": "Heavy rain and wind are expected tomorrow.", "answer_choices": ["yes", "no"]}])
  again, _ = retrieval.key_embeddings(library, library.names(), minilm, "label_instance")
  assert again.shape == (13, 384)
  for n in names:
    path = library.embeddings_path(n, "minilm", "label_instance")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[n]
  # The cached blocks are what the embedder computes now.
  # Unit rows, so atol is relative to their norm; equal here (float32 blocks read back).
  np.testing.assert_allclose(again[:12], first, atol=1e-6)
  library.remove("weather_expert")


def test_vote_ranking_breaks_ties_by_first_vote_then_library_order():
  names = ["a", "b", "c", "d"]
  owners = np.array([0, 1, 2, 3])
  # Queries 0,1 -> key 2 (c), queries 2,3 -> key 1 (b): a 2-2 tie, c voted first.
  similarity = np.array([[0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.float32)
  ranking = retrieval.vote_ranking(similarity, owners, names)
  assert [r["expert"] for r in ranking] == ["c", "b", "a", "d"]
  assert [r["votes"] for r in ranking] == [2, 2, 0, 0]


def test_likelihood_and_oracle_rankings():
  names = ["flat", "sure_right", "sure_wrong"]
  scores = np.full((3, 2, 3), -np.inf)  # two choices each, padded to three
  scores[:, :, :2] = np.log(np.array([
      [[0.5, 0.5], [0.5, 0.5]],
      [[0.9, 0.1], [0.05, 0.95]],
      [[0.2, 0.8], [0.9, 0.1]],
  ]))
  entropy = selection.likelihood_ranking(scores, names, "entropy")
  assert [r["expert"] for r in entropy][0] == "sure_right" and entropy[-1]["expert"] == "flat"
  assert entropy[-1]["entropy"] == pytest.approx(np.log(2))
  max_prob = selection.likelihood_ranking(scores, names, "max_prob")
  assert max_prob[0]["expert"] == "sure_right" and max_prob[0]["max_prob"] == pytest.approx(0.925)
  oracle = selection.oracle_ranking(scores, [0, 1], names)
  assert [(r["expert"], r["accuracy"]) for r in oracle] == [("sure_right", 100.0), ("flat", 50.0),
                                                            ("sure_wrong", 0.0)]


def test_bm25_matches_the_okapi_formula():
  docs = ["the cat sat", "the dog sat on the mat", "a bird"]
  index = retrieval.BM25(docs)
  n, avgdl = 3, (3 + 6 + 2) / 3
  idf_cat = np.log((n - 1 + 0.5) / (1 + 0.5))
  expected_cat = idf_cat * 1 * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 * 3 / avgdl))
  np.testing.assert_allclose(index.scores("cat")[0], expected_cat)
  assert index.scores("cat")[1] == 0.0 and index.scores("unknown").tolist() == [0, 0, 0]


def test_text_formats_follow_the_papers_code():
  row = {"inputs": "Is it raining?", "answer_choices": ["yes", "no"]}
  assert instances.format_text(row, "instance") == "Instance: Is it raining?"
  assert instances.format_text(row, "label") == "Answer Choices: yes, no"
  assert instances.format_text(row, "label_instance") == "Answer Choices: yes, no, Instance: Is it raining?"
  assert instances.format_text({"inputs": "Summarise."}, "label_instance") == "Answer Choices: , Instance: Summarise."
  with pytest.raises(instances.InstanceError, match="text_format"):
    instances.format_text(row, "labels")
