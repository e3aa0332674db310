"""BIG-bench JSON tasks: ELM's exact prompt string, the correct index (first max on ties),
rank-classification rows and errors naming the file, the example index and the field."""

import json

import pytest

from elm_jax.errors import UserInputError
from tasks import bigbench
from tasks.rank_classification import RankClassificationError


def _write(tmp_path, task, name="task.json"):
  p = tmp_path / name
  p.write_text(json.dumps(task))
  return str(p)


TASK = {
    "name": "toy",
    "task_prefix": "Answer the question.",
    "examples": [
        {"input": "Is the sky blue?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Pick one.", "target_scores": {"b": 0, "a": 1, "c": 1}},
    ],
}


def test_exact_format(tmp_path):
  task = bigbench.load_bigbench_task(_write(tmp_path, TASK))
  assert task.name == "toy"
  inputs, choices, correct = bigbench.format_example(task, task.examples[0])
  assert inputs == "Answer the question.\nQ: Is the sky blue?\n choice: yes\n choice: no\nA: "
  assert choices == ["yes", "no"] and correct == 0


def test_file_order_and_first_max_on_ties(tmp_path):
  task = bigbench.load_bigbench_task(_write(tmp_path, TASK))
  inputs, choices, correct = bigbench.format_example(task, task.examples[1])
  assert choices == ["b", "a", "c"] and correct == 1
  assert inputs.endswith("\nQ: Pick one.\n choice: b\n choice: a\n choice: c\nA: ")


def test_no_prefix(tmp_path):
  task = bigbench.load_bigbench_task(_write(tmp_path, {"examples": TASK["examples"][:1]}))
  inputs, _, _ = bigbench.format_example(task, task.examples[0])
  assert inputs == "\nQ: Is the sky blue?\n choice: yes\n choice: no\nA: "


def test_rank_rows(tmp_path):
  task = bigbench.load_bigbench_task(_write(tmp_path, TASK))
  rows = bigbench.rank_rows(task)
  assert [r["idx"] for r in rows] == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
  assert [r["is_correct"] for r in rows] == [True, False, False, True, False]
  assert rows[3]["targets"] == "a"
  assert [r["idx"] for r in bigbench.rank_rows(task, mode="train")] == [[0, 0], [1, 1]]


def test_single_choice_fails_with_file_and_index(tmp_path):
  path = _write(tmp_path, {"examples": [TASK["examples"][0],
                                        {"input": "q", "target_scores": {"only": 1}}]})
  task = bigbench.load_bigbench_task(path)
  with pytest.raises(RankClassificationError) as e:
    bigbench.rank_rows(task)
  assert path in str(e.value) and "example 1" in str(e.value)


def test_missing_examples(tmp_path):
  path = _write(tmp_path, {"name": "toy"})
  with pytest.raises(bigbench.BigBenchError) as e:
    bigbench.load_bigbench_task(path)
  assert path in str(e.value) and "'examples'" in str(e.value)
  assert isinstance(e.value, UserInputError)


def test_missing_target_scores(tmp_path):
  path = _write(tmp_path, {"examples": [TASK["examples"][0], {"input": "no scores"}]})
  with pytest.raises(bigbench.BigBenchError) as e:
    bigbench.load_bigbench_task(path)
  message = str(e.value)
  assert path in message and "example 1" in message and "'target_scores'" in message


def test_missing_input(tmp_path):
  path = _write(tmp_path, {"examples": [{"target_scores": {"a": 1, "b": 0}}]})
  with pytest.raises(bigbench.BigBenchError, match=r"example 0: field 'input'"):
    bigbench.load_bigbench_task(path)


def test_generative_example_is_tolerated(tmp_path):
  path = _write(tmp_path, {"examples": [{"input": "2+2=", "target": "4"}]})
  task = bigbench.load_bigbench_task(path)
  assert task.examples[0].targets == ["4"]
  assert bigbench.format_inputs(task, task.examples[0]) == "\nQ: 2+2=\nA: "
  with pytest.raises(bigbench.BigBenchError, match=r"example 0: field 'target_scores'"):
    bigbench.format_example(task, task.examples[0])
