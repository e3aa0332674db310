"""Metrics for generated text: ROUGE-1/2/L F-measure (the `rouge-score` package, Porter stemming
as T5's `rouge` metric), corpus BLEU (`sacrebleu`, its default 13a tokenisation) and exact match.
All are percentages over a list of predictions and their references."""

from __future__ import annotations

from typing import Sequence

from elm_jax.errors import UserInputError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """% of predictions equal to their reference after stripping surrounding whitespace."""
  _check(predictions, references)
  hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
  return 100.0 * hits / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure (%) of each prediction against its reference."""
  from rouge_score import rouge_scorer
  _check(predictions, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(reference, prediction)
    for kind in ROUGE_TYPES:
      totals[kind] += scores[kind].fmeasure
  return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU (%) with one reference per prediction."""
  import sacrebleu
  _check(predictions, references)
  return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  return {**rouge(predictions, references), "bleu": bleu(predictions, references),
          "exact_match": exact_match(predictions, references)}


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
  if len(predictions) != len(references):
    raise UserInputError(f"metrics: {len(predictions)} predictions for {len(references)} references")
  if not predictions:
    raise UserInputError("metrics: no predictions to score")
