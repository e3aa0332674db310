"""Generation metrics against hand-computed values (ROUGE n-gram overlap, BLEU, exact match)."""

import pytest

from elm_jax.errors import UserInputError
from elm_jax.evaluation import generation_metrics as gm


def test_identical_texts_score_100():
  texts = ["the cat sat on the mat", "a quick brown fox jumps"]
  metrics = gm.generation_metrics(texts, texts)
  assert metrics == pytest.approx({"rouge1": 100, "rouge2": 100, "rougeL": 100, "bleu": 100,
                                   "exact_match": 100})


def test_rouge_by_hand():
  # prediction "the cat sat", reference "the cat ran away": unigram overlap 2 ("the", "cat"),
  # P = 2/3, R = 2/4 -> F = 4/7; bigram overlap 1 ("the cat"), P = 1/2, R = 1/3 -> F = 2/5;
  # LCS "the cat" = 2, so rougeL equals rouge1 here.
  scores = gm.rouge(["the cat sat"], ["the cat ran away"])
  assert scores["rouge1"] == pytest.approx(100 * 4 / 7)
  assert scores["rouge2"] == pytest.approx(100 * 2 / 5)
  assert scores["rougeL"] == pytest.approx(100 * 4 / 7)


def test_rouge_uses_porter_stemming():
  assert gm.rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(100)


def test_exact_match_and_bleu():
  assert gm.exact_match([" yes", "no", "maybe"], ["yes ", "yes", "maybe"]) == pytest.approx(200 / 3)
  assert gm.bleu(["completely different words here"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_bad_inputs():
  with pytest.raises(UserInputError, match="2 predictions for 1 references"):
    gm.exact_match(["a", "b"], ["a"])
  with pytest.raises(UserInputError, match="no predictions"):
    gm.rouge([], [])
