"""Continual generative tasks from local JSON: fields, the training cap and its seed-42 draw, the
300-example eval cut, the paper's 16 evaluation prompts with their metrics, bad rows."""

import json
import pathlib

import pytest
import seqio

from tasks import continual, inventory, raw_sources
from tests.helpers import p3_data

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")


def test_register_and_read(tmp_path):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"src": f"simplify: long sentence {i}", "tgt": f"short {i}"}) + "\n"
                           for i in range(5)))
  evaluation = tmp_path / "eval.json"
  evaluation.write_text(json.dumps([{"src": f"simplify: s{i}", "tgt": f"t{i}"} for i in range(400)]))
  name = continual.register_continual_task(
      "test_continual_simplify", {"train": str(train), "validation": str(evaluation)},
      seqio.SentencePieceVocabulary(SPM), inputs_field="src", targets_field="tgt")
  task = seqio.TaskRegistry.get(name)
  train_rows = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  assert [r["targets_pretokenized"].decode() for r in train_rows] == [f"short {i}" for i in range(5)]
  eval_rows = list(task.get_dataset(sequence_length=None, split="validation", shuffle=False).as_numpy_iterator())
  assert len(eval_rows) == 300
  again = continual.continual_rows(str(evaluation), "src", "tgt", limit=300, seed=42)
  assert [r["targets"] for r in again] == [r["targets_pretokenized"].decode() for r in eval_rows]


def test_missing_field_names_file_and_example(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
  with pytest.raises(raw_sources.RawDataError, match="bad.jsonl: example 1: field 'target' must be a string"):
    continual.continual_rows(str(bad))


def _read(task, split):
  rows = seqio.TaskRegistry.get(task).get_dataset(sequence_length=None, split=split, shuffle=False)
  return [(r["inputs_pretokenized"].decode(), r["targets_pretokenized"].decode()) for r in rows.as_numpy_iterator()]


def test_the_cap_and_the_seed_42_draw_apply_to_the_training_data(tmp_path):
  """A continual expert's training rows: at most its cap, the first of the paper's
  torch.randperm(rows, generator seed 42) (PyTorch's output, golden), read in file order; every
  row when the file is under the cap."""
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(32)))
  name = continual.register_continual_task("test_continual_capped", {"train": str(train)},
                                           seqio.SentencePieceVocabulary(SPM),
                                           train_sample=inventory.TrainSample(6, "permutation"))
  golden = json.load(open(pathlib.Path(SPM).parents[1] / "torch_randperm" / "randperm_golden.json"))
  chosen = sorted(next(c["first"] for c in golden["cases"] if (c["n"], c["seed"]) == (32, 42))[:6])
  assert _read(name, "train") == [(f"s{i}", f"t{i}") for i in chosen]
  whole = continual.train_rows([{"i": i} for i in range(5)], inventory.TrainSample(6, "permutation"))
  assert whole == [{"i": i} for i in range(5)]


def test_expert_samples_follow_the_papers_code():
  samples = {e.dataset: continual.expert_sample(e) for e in continual.CONTINUAL_EXPERTS}
  assert (samples["covid_qa"].samples, samples["covid_qa"].sampling) == (100_000, "permutation")
  assert (samples["gigaword"].samples, samples["gigaword"].sampling) == (100_000, "permutation")
  # wiki_auto's task class returns its whole train split, whatever the cap.
  assert (samples["wiki_auto"].samples, samples["wiki_auto"].sampling) == (None, "all")
  configs = continual.expert_sample(continual.CONTINUAL_EXPERTS[0], "configs")
  assert (configs.samples, configs.sampling) == (100_000, "permutation")


# ELM_NOTES §2.3 / §3: the 16 evaluation prompts of cT0_eval.json and the metric the authors'
# summary table uses for each (BLEU for wiki_auto/asset, ROUGE-1 for gigaword and haiku,
# BERTScore for the other five).
PAPER_EVAL = {("wiki_auto", "simplification_1"): "BLEU", ("wiki_auto", "simplification_2"): "BLEU",
              ("asset", "simplification_1"): "BLEU", ("asset", "simplification_2"): "BLEU",
              **{("gigaword", f"constrain_{c}+{p}"): "ROUGE-1" for c in ("contain", "end", "start")
                 for p in ("make_a_title", "write_its_sentence")},
              ("haiku", "do_nothing"): "ROUGE-1", ("covid_qa", "covid_qa_deepset"): "BERTScore",
              ("eli5", "generate_a_question_1"): "BERTScore",
              ("empathetic_dialogues", "dialogue_with_emotion"): "BERTScore",
              ("esnli", "explain_why"): "BERTScore", ("twitter_top20", "tweet_as+about"): "BERTScore"}


@pytest.fixture
def clean_registry():
  names = [e.name for e in continual.CONTINUAL_EXPERTS] + [p.name for p in continual.CONTINUAL_EVAL]

  def clean():
    for name in names:
      seqio.TaskRegistry.remove(name)
    for mixture in (continual.CONTINUAL_MIXTURE, continual.CONTINUAL_EVAL_MIXTURE):
      seqio.MixtureRegistry.remove(mixture)
  clean()
  yield
  clean()


def test_continual_evaluation_registers_the_papers_16_prompts(tmp_path, clean_registry):
  assert len(PAPER_EVAL) == 16
  got = {(p.dataset, p.prompt): p for p in continual.CONTINUAL_EVAL}
  assert set(got) == set(PAPER_EVAL)
  here = {"BLEU": "bleu", "ROUGE-1": "rouge1", "BERTScore": "rougeL"}
  for key, metric in PAPER_EVAL.items():
    assert (got[key].metric, got[key].metric_here) == (metric, here[metric]), key
    assert inventory.continual_metrics()[got[key].name] == here[metric]
  # The 10 experts' prompts read their validation files; the other 6 their own directories.
  for expert in continual.CONTINUAL_EXPERTS:
    p3_data.write_continual(tmp_path, expert.name, 4)
    p3_data.write_continual(tmp_path, expert.name, 3, split="validation")
  own = [p for p in continual.CONTINUAL_EVAL if p.expert is None]
  assert sorted((p.dataset, p.prompt) for p in own) == sorted(
      [("wiki_auto", "simplification_2"), ("asset", "simplification_1"), ("asset", "simplification_2")]
      + [("gigaword", f"constrain_{c}+write_its_sentence") for c in ("contain", "end", "start")])
  for i, prompt in enumerate(own):
    p3_data.write_continual(tmp_path, prompt.name, 5 + i, split="validation")
  assert len(continual.register_continual_experts(str(tmp_path), seqio.SentencePieceVocabulary(SPM))) == 10
  mixture = seqio.MixtureRegistry.get(continual.CONTINUAL_EVAL_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(p.name for p in continual.CONTINUAL_EVAL)
  for i, prompt in enumerate(own):
    assert len(_read(prompt.name, "validation")) == 5 + i
  shared = next(p for p in continual.CONTINUAL_EVAL if p.dataset == "haiku")
  assert _read(shared.name, "validation") == _read(shared.expert, "validation")
  assert len(_read(continual.CONTINUAL_EXPERTS[0].name, "train")) == 4


def test_without_data_every_prompt_says_what_to_set(clean_registry, monkeypatch):
  monkeypatch.delenv(continual.CONTINUAL_DATA_DIR_ENV, raising=False)
  continual.register_continual_experts()
  asset = next(p for p in continual.CONTINUAL_EVAL if p.dataset == "asset")
  with pytest.raises(Exception, match=rf"{asset.name}: set \$ELM_CONTINUAL_DATA_DIR"):
    _read(asset.name, "validation")
