"""The Expert Library end to end, as a user runs it: experts trained by `elm-jax train` on the
built-in suite, then `library`, `retrieve`, `merge`, `eval` and `score --library`; and continual
addition leaving existing experts' files and evaluation results unchanged."""

import csv
import json
import os

import numpy as np
import pytest

from elm_jax.checkpoints import loading
from elm_jax.commands import cli
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.minilm import MiniLMEmbedder
from elm_jax.vocabularies import SentencePieceVocabulary
from tests.helpers.golden import GOLDEN_DIR
from tests.helpers.library import snapshot

FIRST = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of"]
LATER = ["builtin_paraphrase_same_meaning"]


def _train(model_dir, tasks, capsys):
  code = cli.main([
      "train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin",
      "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.EXPERT_TASKS={tasks!r}", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=2",
      "--gin.INPUT_LENGTH=64"])
  assert code == 0, capsys.readouterr().err


def _run(capsys, *argv) -> str:
  capsys.readouterr()
  code = cli.main(list(argv))
  out = capsys.readouterr()
  assert code == 0, out.err
  return out.out


@pytest.mark.slow
def test_library_retrieve_merge_eval_and_continual_addition(tmp_path, capsys):
  _train(tmp_path / "run1", FIRST, capsys)
  lib = str(tmp_path / "lib")
  out = _run(capsys, "library", "add", f"--library={lib}", str(tmp_path / "run1"))
  assert out.count("100 retrieval keys") == 3
  listing = _run(capsys, "library", "list", f"--library={lib}")
  assert sorted(line.split("\t")[0] for line in listing.splitlines()) == sorted(FIRST)
  _run(capsys, "library", "verify", f"--library={lib}")

  # RoE with the paper's retriever: the other sentiment prompt's inputs find the sentiment expert.
  ranking_file = tmp_path / "ranking.json"
  out = _run(capsys, "retrieve", f"--library={lib}", "--task=builtin_sentiment_rate_review",
             "--method=roe", "--top_k=3", f"--output={ranking_file}")
  assert out.splitlines()[0].split("\t")[:2] == ["1", "builtin_sentiment_is_positive"]
  ranking = json.loads(ranking_file.read_text())
  assert ranking["queries"] == 32 and sum(r["votes"] for r in ranking["ranking"]) == 32
  for method in ("likelihood", "oracle"):
    out = _run(capsys, "retrieve", f"--library={lib}", "--task=builtin_nli_can_we_infer",
               f"--method={method}", "--top_k=3")
    assert sorted(line.split("\t")[1] for line in out.splitlines()) == sorted(FIRST)

  # The paper's merge of the top-2 retrieved experts is the mean of their tensors.
  _run(capsys, "merge", f"--library={lib}", f"--ranking={ranking_file}", "--top_k=2", "--name=top2")
  library = ExpertLibrary(lib)
  merged, meta = library.load("top2")
  members = [library.load(r["expert"])[0] for r in ranking["ranking"][:2]]
  kernel = ("encoder", "layers_0", "mlp_adapter", "up_kernel")
  pick = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]]  # noqa: E731
  # Equal here: the mean of two float32 tensors rounds once whichever way it is computed.
  np.testing.assert_allclose(pick(merged), (pick(members[0]) + pick(members[1])) / 2, rtol=1e-6)
  assert library.entry("top2")["provenance"]["merged_from"] == [r["expert"] for r in ranking["ranking"][:2]]

  # Every expert at once on a multiple-choice and a generative task.
  before_dir = tmp_path / "eval_before"
  _run(capsys, "eval", f"--library={lib}", "--task=builtin_nli_gpt3_style", f"--output_dir={before_dir}",
       "--max_examples=24", "--batch_size=8")
  _run(capsys, "eval", f"--library={lib}", "--experts=top2,builtin_topic_which_topic",
       "--task=builtin_title_generation_headline", f"--output_dir={tmp_path / 'eval_gen'}",
       "--max_examples=8", "--max_target_length=8", "--batch_size=8")
  rows = list(csv.DictReader(open(tmp_path / "eval_gen" / "results.csv")))
  assert {r["metric"] for r in rows} == {"rouge1", "rouge2", "rougeL", "bleu", "exact_match"}
  results = json.loads((before_dir / "results.json").read_text())
  task = results["tasks"][0]
  assert set(task["metrics"]) == set(FIRST) | {"top2"} and task["examples"] == 24
  predictions = [json.loads(l) for l in open(before_dir / "predictions" / "builtin_nli_gpt3_style.jsonl")]
  for expert in task["metrics"]:  # the reported accuracy is the one the saved predictions give
    hits = [p["predictions"][expert] == p["label"] for p in predictions]
    assert task["metrics"][expert]["accuracy"] == pytest.approx(100 * np.mean(hits))
  assert "mean over prompts" in (before_dir / "results.md").read_text()

  # Continual addition: a new expert (same backbone) leaves old files and results unchanged.
  before = {k: v for k, v in snapshot(lib).items()
              if k.startswith(("experts/", "retrieval/"))}
  _train(tmp_path / "run2", LATER, capsys)
  _run(capsys, "library", "add", f"--library={lib}", str(tmp_path / "run2"))
  after = snapshot(lib)
  assert {k: after[k] for k in before} == before
  assert sorted(ExpertLibrary(lib).names()) == sorted(FIRST + LATER + ["top2"])
  after_dir = tmp_path / "eval_after"
  _run(capsys, "eval", f"--library={lib}", "--task=builtin_nli_gpt3_style", f"--output_dir={after_dir}",
       "--max_examples=24", "--batch_size=8")
  new = json.loads((after_dir / "results.json").read_text())["tasks"][0]["metrics"]
  assert {e: new[e] for e in task["metrics"]} == task["metrics"]
  assert set(new) == set(task["metrics"]) | set(LATER)
  out = _run(capsys, "retrieve", f"--library={lib}", "--task=builtin_paraphrase_paraphrase_or_not",
             "--method=roe", "--top_k=1")
  assert out.split("\t")[1] == "builtin_paraphrase_same_meaning"


def test_embed_command_minilm_and_t5(tmp_path, capsys):
  lines = ["The telescope found a planet.", "Bake the bread for forty minutes.", ""]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  _run(capsys, "embed", f"--input={tmp_path / 'in.txt'}", f"--output={tmp_path / 'minilm.npy'}")
  got = np.load(tmp_path / "minilm.npy")
  assert got.shape == (3, 384) and got.dtype == np.float32
  # Unit rows (atol relative to their norm); the same embedder, equal here.
  np.testing.assert_allclose(got, MiniLMEmbedder().embed(lines, max_length=256), atol=1e-6)

  checkpoint = GOLDEN_DIR / "t5_v1_1"
  _run(capsys, "embed", "--embedder=t5", f"--checkpoint={checkpoint}", f"--input={tmp_path / 'in.txt'}",
       f"--output={tmp_path / 't5.npy'}")
  got = np.load(tmp_path / "t5.npy")
  loaded = loading.load_model_checkpoint(str(checkpoint))
  vocabulary = SentencePieceVocabulary(loaded.vocab_path)
  for row, text in zip(got, lines):  # mean of the encoder outputs over the text's tokens + EOS
    ids = np.array([vocabulary.encode(text) + [1]], np.int32)
    hidden = np.asarray(loaded.model.encode(loaded.params, ids)[0])[0]
    expected = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
    # Unit rows; batched and padded against alone, not exact: worst seen 1.6e-7.
    np.testing.assert_allclose(row, expected, atol=1e-5)
  capsys.readouterr()
  assert cli.main(["embed", f"--input={tmp_path / 'missing.txt'}", f"--output={tmp_path / 'x.npy'}"]) == 2
  assert "missing.txt: input file not found" in capsys.readouterr().err
