"""The built-in miniature of T0: deterministic, well-formed, balanced, lazily registered."""

import collections

import pytest
import seqio

from tasks import builtin_registry, builtin_suite as suite


def test_shape_of_the_suite():
  roles = suite.roles()
  train_datasets = {s.dataset for s in roles["train"]}
  held_out = {s.dataset for s in roles["held_out"]}
  assert len(train_datasets) == 8 and all(2 <= len(suite.prompts_of(d)) <= 4 for d in train_datasets)
  assert held_out == {"nli", "coreference", "sentence_completion", "word_sense"}
  assert all(len(suite.prompts_of(d)) >= 3 for d in held_out)
  assert len(roles["continual"]) == 2 and all(not s.multiple_choice for s in roles["continual"])
  assert len(roles["composed"]) == 1
  assert set(suite.COMPOSED_FROM["titled_sentiment"]) <= train_datasets
  kinds = {s.multiple_choice for s in roles["train"]}
  assert kinds == {True, False}  # both multiple-choice and generative training prompts


def test_deterministic_and_splits_disjoint():
  for spec in suite.SUITE:
    a = suite.generate(spec.dataset, spec.prompt, "train", 30)
    assert a == suite.generate(spec.dataset, spec.prompt, "train", 30)
  for spec in suite.SUITE:
    train = {(e["inputs"], e["targets"]) for e in suite.generate(spec.dataset, spec.prompt, "train", 400)}
    validation = {(e["inputs"], e["targets"]) for e in suite.generate(spec.dataset, spec.prompt, "validation", 50)}
    assert not train & validation, spec
  assert len({e["inputs"] for e in suite.generate("nli", "can_we_infer", "validation", 50)}) > 30
  assert suite.generate("nli", "can_we_infer", "train", 5, seed=1) != suite.generate("nli", "can_we_infer", "train", 5)


def test_examples_are_well_formed_and_labels_balanced():
  for spec in suite.SUITE:
    examples = suite.generate(spec.dataset, spec.prompt, "train", 300)
    for e in examples:
      assert isinstance(e["inputs"], str) and e["inputs"] and isinstance(e["targets"], str) and e["targets"]
      if spec.multiple_choice:
        assert len(e["answer_choices"]) >= 2 and all(isinstance(c, str) for c in e["answer_choices"])
        assert e["answer_choices"][e["label"]] == e["targets"]
      else:
        assert e["answer_choices"] is None
    if spec.role == "held_out":
      counts = collections.Counter(e["label"] for e in examples)
      num = len(examples[0]["answer_choices"])
      assert len(counts) == num and min(counts.values()) > 0.5 * 300 / num, (spec, counts)


def test_nli_labels_follow_construction():
  for e in suite.generate("nli", "can_we_infer", "train", 200):
    premise, hypothesis = e["inputs"].split(' Can we infer that "')
    if "all of Monday" in hypothesis or "nothing" in hypothesis:
      assert e["targets"] == "No"
    elif "likes" in hypothesis or "lives in" in hypothesis or "expensive" in hypothesis:
      assert e["targets"] == "Maybe"
    else:
      assert e["targets"] == "Yes"


def test_unknown_names():
  with pytest.raises(suite.SuiteError, match="unknown dataset 'nope'; expected one of"):
    suite.generate("nope", "x", "train", 1)
  with pytest.raises(suite.SuiteError, match="dataset 'nli' has no prompt 'x'"):
    suite.generate("nli", "x", "train", 1)


def test_vocabulary_is_cached(tmp_path, monkeypatch):
  """The SentencePiece model is trained once per cache directory: a second call returns the
  cached file without training again (counted, not timed)."""
  path = builtin_registry.builtin_vocabulary(str(tmp_path))
  trained = []
  monkeypatch.setattr(builtin_registry.spm.SentencePieceTrainer, "Train",
                      lambda *a, **k: trained.append(k))
  assert builtin_registry.builtin_vocabulary(str(tmp_path)) == path and not trained
  vocab = seqio.SentencePieceVocabulary(path)
  text = "Alice thanked Bob because he had helped."
  assert vocab.decode(vocab.encode(text)) == text


def test_registered_tasks_and_mixtures(tmp_path):
  mixtures = builtin_registry.register_builtin_suite(num_train=16, num_eval=8, cache_dir=str(tmp_path))
  assert builtin_registry.register_builtin_suite(num_train=16, num_eval=8, cache_dir=str(tmp_path)) == mixtures
  assert len(mixtures["builtin_train"]) == sum(len(suite.prompts_of(d)) for d in
                                               {s.dataset for s in suite.roles()["train"]})
  assert all(m.endswith("_score_eval") for m in mixtures["builtin_held_out"])
  task = seqio.TaskRegistry.get("builtin_sentiment_is_positive")
  examples = list(task.get_dataset(sequence_length={"inputs": 128, "targets": 32}, split="train",
                                   shuffle=False).as_numpy_iterator())
  assert len(examples) == 16 and examples[0]["inputs"][-1] == 1
  held = seqio.TaskRegistry.get("builtin_nli_can_we_infer_score_eval")
  rows = list(held.get_dataset(sequence_length={"inputs": 128, "targets": 32}, split="validation",
                               shuffle=False).as_numpy_iterator())
  assert len(rows) == 8 * 3
  mixture = seqio.MixtureRegistry.get("builtin_train")
  batch = next(mixture.get_dataset(sequence_length={"inputs": 128, "targets": 32}, split="train",
                                   shuffle=False).as_numpy_iterator())
  assert batch["targets"].dtype.kind == "i"


def test_listed_by_the_tasks_command(capsys):
  from elm_jax.commands import cli
  assert cli.main(["tasks", "list"]) == 0
  out = capsys.readouterr().out
  assert "builtin_nli_can_we_infer: held_out, multiple choice" in out
  assert "builtin_titled_sentiment_title_then_reaction: composed, generative (composes title_generation, sentiment)" in out


def test_registering_again_with_other_settings_replaces_the_tasks(tmp_path):
  def count():
    task = seqio.TaskRegistry.get("builtin_sentiment_is_positive")
    return len(list(task.get_dataset(split="train", sequence_length=None, shuffle=False).as_numpy_iterator()))
  builtin_registry.register_builtin_suite(num_train=12, num_eval=4, cache_dir=str(tmp_path))
  assert count() == 12
  builtin_registry.register_builtin_suite(num_train=20, num_eval=4, cache_dir=str(tmp_path))
  assert count() == 20
  assert len(seqio.MixtureRegistry.get("builtin_train").tasks) == len(
      [s for s in suite.SUITE if s.role == "train"])
