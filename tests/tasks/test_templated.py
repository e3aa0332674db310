"""Raw data + a promptsource template -> SeqIO tasks (as P3 was made), and BIG-bench files."""

import json
import pathlib

import pytest
import seqio

from tasks import templated, templates

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")
TEMPLATES = """dataset: super_glue
subset: cb
templates:
  1a: !Template
    answer_choices: Yes ||| Maybe ||| No
    id: 1a
    jinja: 'Suppose {{premise}} Can we infer that "{{hypothesis}}"? Yes, no, or maybe? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages: [en]
      metrics: [Accuracy]
      original_task: true
    name: can we infer
    reference: ''
  2b: !Template
    id: 2b
    jinja: 'Write a hypothesis for: {{premise}} ||| {{hypothesis}}'
    metadata: !TemplateMetadata
      original_task: false
    name: generate hypothesis
    reference: ''
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("templated")
  (root / "templates.yaml").write_text(TEMPLATES)
  rows = [{"premise": "The cat sat.", "hypothesis": "A cat sat.", "label": 0},
          {"premise": "It rained.", "hypothesis": "It was sunny.", "label": 2}]
  (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "validation.csv").write_text("premise,hypothesis,label\nA dog ran.,An animal ran.,0\n")
  return root


def test_rank_classification_template(files):
  names = templated.register_templated_task(
      "test_tpl_cb_can_we_infer", str(files / "templates.yaml"), "can we infer",
      seqio.SentencePieceVocabulary(SPM),
      sources={"train": str(files / "train.jsonl"), "validation": str(files / "validation.csv")})
  assert names == ["test_tpl_cb_can_we_infer", "test_tpl_cb_can_we_infer_score_eval"]
  train = list(seqio.TaskRegistry.get(names[0]).get_dataset(sequence_length=None, split="train", shuffle=False))
  assert [e["targets_pretokenized"].numpy().decode() for e in train] == ["Yes", "No"]
  assert train[0]["inputs_pretokenized"].numpy().decode() == (
      'Suppose The cat sat. Can we infer that "A cat sat."? Yes, no, or maybe?')
  rows = list(seqio.TaskRegistry.get(names[1]).get_dataset(sequence_length=None, split="train", shuffle=False))
  assert [r["targets_pretokenized"].numpy().decode() for r in rows[:3]] == ["Yes", "Maybe", "No"]
  assert [bool(r["is_correct"]) for r in rows] == [True, False, False, False, False, True]


def test_generative_template_has_no_score_eval(files):
  names = templated.register_templated_task(
      "test_tpl_cb_generate", str(files / "templates.yaml"), "generate hypothesis",
      seqio.SentencePieceVocabulary(SPM), sources={"train": str(files / "train.jsonl")})
  assert names == ["test_tpl_cb_generate"]


def test_csv_label_that_is_not_an_index_names_example(files):
  # CSV fields are strings: answer_choices[label] with label '0' fails to render.
  names = templated.register_templated_task(
      "test_tpl_cb_csv", str(files / "templates.yaml"), "can we infer",
      seqio.SentencePieceVocabulary(SPM), sources={"validation": str(files / "validation.csv")})
  with pytest.raises(templates.TemplateError, match="example 0") as error:
    seqio.TaskRegistry.get(names[0]).get_dataset(sequence_length=None, split="validation")
  assert "templates.yaml" in str(error.value) and "can we infer" in str(error.value)


def test_bigbench_task(tmp_path):
  path = tmp_path / "task.json"
  path.write_text(json.dumps({"name": "tiny", "task_prefix": "Answer.", "examples": [
      {"input": "2+2?", "target_scores": {"3": 0, "4": 1}},
      {"input": "sky?", "target_scores": {"blue": 1, "green": 0, "red": 0}}]}))
  names = templated.register_bigbench_task("test_bb_tiny", str(path), seqio.SentencePieceVocabulary(SPM))
  rows = list(seqio.TaskRegistry.get(names[1]).get_dataset(sequence_length=None, split="validation", shuffle=False))
  assert len(rows) == 5
  assert rows[0]["inputs_pretokenized"].numpy().decode() == "Answer.\nQ: 2+2?\n choice: 3\n choice: 4\nA: "
  assert [bool(r["is_correct"]) for r in rows] == [False, True, True, False, False]


@pytest.mark.parametrize("pack", [False, True])
def test_templated_and_bigbench_batches_for_the_t5(files, tmp_path, pack):
  """promptsource YAML and BIG-bench JSON read through registered tasks into T5 batches."""
  names = templated.register_templated_task(
      "test_tpl_cb_batches", str(files / "templates.yaml"), "can we infer",
      seqio.SentencePieceVocabulary(SPM), sources={"train": str(files / "train.jsonl")})
  lengths = {"inputs": 64, "targets": 8}
  for name, split in ((names[0], "train"), (names[1], "train")):
    ds = seqio.TaskRegistry.get(name).get_dataset(sequence_length=lengths, split=split, shuffle=False)
    batch = next(seqio.EncDecFeatureConverter(pack=pack)(ds, lengths).batch(2).as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (2, 64) and batch["decoder_target_tokens"].shape == (2, 8)


def test_bigbench_13_from_a_checkout(tmp_path):
  from tasks import inventory, mixtures
  root = tmp_path / "benchmark_tasks"
  for entry in inventory.load_inventory()["bigbench"]:
    for sub in entry["subtasks"] or [None]:
      d = root / entry["task"] / sub if sub else root / entry["task"]
      d.mkdir(parents=True)
      (d / "task.json").write_text(json.dumps({"examples": [{"input": "x?", "target_scores": {"a": 1, "b": 0}}]}))
  members = mixtures.register_bigbench_13(str(root), seqio.SentencePieceVocabulary(SPM))
  # The paper's 13 tasks, sub-tasks grouped into their task (homonyms twice, as its list has it).
  assert members == [f"bigbench_{e['task']}_score_eval" for e in inventory.load_inventory()["bigbench"]]
  count = lambda name: len(list(seqio.get_mixture_or_task(name).source.get_dataset(  # noqa: E731
      split="validation", shuffle=False)))
  assert count("bigbench_conceptual_combinations") == 7 and count("bigbench_logical_deduction") == 3
  assert count("bigbench_logical_deduction_five_objects") == 1  # each sub-task stays available
  rows = list(seqio.get_mixture_or_task("bigbench_13").get_dataset(
      sequence_length={"inputs": 32, "targets": 4}, split="validation", shuffle=False).take(4))
  assert len(rows) == 4
