"""`elm_jax.api`: the README's library walkthrough from Python gives what the commands give.

One module fixture trains the same three experts of the built-in suite twice, once with
`elm-jax train` and once with `api.train_experts` (the gin recipe), then walks both through
library add, score, retrieve, merge and eval, each side with its own tools; the tests compare
the two. The Python-valued `train_experts` (no gin) is checked against the gin recipe, and the
API's refusals against the commands' errors. Every public name has a docstring with an example
and a section in docs/API.md.
"""

import inspect
import json
import os
import pydoc
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import elm_jax
from elm_jax import api
from elm_jax.commands import cli, score_command
from elm_jax.errors import UserInputError
from elm_jax.library import selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of"]
RECIPE = ["models/t5_1_1_mini.gin", "runs/train_builtin_experts.gin"]
SETTINGS = {"TRAIN_STEPS": 2, "BATCH_SIZE": 2, "INPUT_LENGTH": 32, "TARGET_LENGTH": 8}
TARGET = "builtin_sentiment_rate_review"
EXAMPLES = [{"id": "a", "inputs": "Review: a wonderful, moving film. Is it positive?", "choices": ["yes", "no"]},
            {"id": 7, "inputs": "Which topic: the striker scored twice.", "choices": ["sports", "politics", "science"]}]


def _cli(*argv) -> None:
  assert cli.main([str(a) for a in argv]) == 0, argv


def _tensors(directory) -> dict:
  return load_file(os.path.join(directory, "tensors.safetensors"))


def _assert_same_tensors(a, b) -> None:
  ta, tb = _tensors(a), _tensors(b)
  assert sorted(ta) == sorted(tb)
  for name in ta:
    np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
  """Both sides of the walkthrough: {"cmd": {...}, "api": {...}} with each side's paths and outputs."""
  root = tmp_path_factory.mktemp("walk")
  cmd = {"run": root / "cmd_run", "lib": root / "cmd_lib", "rank": root / "rank.json", "eval": root / "cmd_eval",
         "scores": root / "scores.jsonl", "input": root / "input.jsonl"}
  gin_flags = [f"--gin_file={f}" for f in RECIPE] + [f"--gin.{k}={v!r}" for k, v in SETTINGS.items()]
  _cli("train", "--no_progress", *gin_flags, f"--gin.MODEL_DIR='{cmd['run']}'", f"--gin.EXPERT_TASKS={TASKS!r}")
  _cli("library", "add", f"--library={cmd['lib']}", cmd["run"])
  cmd["input"].write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
  _cli("score", f"--library={cmd['lib']}", f"--input={cmd['input']}", f"--output={cmd['scores']}")
  _cli("retrieve", f"--library={cmd['lib']}", f"--task={TARGET}", "--embedder=bm25", "--top_k=3",
       f"--output={cmd['rank']}")
  _cli("merge", f"--library={cmd['lib']}", f"--ranking={cmd['rank']}", "--top_k=2", "--name=top2")
  _cli("eval", f"--library={cmd['lib']}", "--task=builtin_held_out", "--max_examples=4", "--no_progress",
       f"--output_dir={cmd['eval']}")

  side = {"run": root / "api_run", "lib": root / "api_lib", "eval": root / "api_eval"}
  side["final"] = api.train_experts(str(side["run"]), TASKS, gin_files=RECIPE, gin_bindings=SETTINGS,
                                    progress=False)
  side["names"] = api.add_experts(str(side["lib"]), [str(side["run"])])
  side["scores"] = api.score(str(side["lib"]), EXAMPLES)
  side["selection"] = api.select_experts(str(side["lib"]), task=TARGET, embedder="bm25")
  side["provenance"] = api.merge(api.open_library(str(side["lib"])), side["selection"], "top2", top_k=2)
  side["evaluation"] = api.evaluate(str(side["lib"]), "builtin_held_out", max_examples=4, progress=False,
                                    output_dir=str(side["eval"]))
  return {"cmd": cmd, "api": side, "root": root}


@pytest.mark.slow
def test_train_and_library_add_match_the_commands(walk):
  cmd, side = walk["cmd"], walk["api"]
  assert sorted(side["final"]) == sorted(TASKS)
  for task in TASKS:
    _assert_same_tensors(cmd["run"] / "experts" / task, side["run"] / "experts" / task)
  assert side["names"] == sorted(TASKS)
  manifests = [json.loads((lib / "manifest.json").read_text()) for lib in (cmd["lib"], side["lib"])]
  for name in TASKS:
    a, b = (m["experts"][name] for m in manifests)
    assert a["files"]["tensors.safetensors"] == b["files"]["tensors.safetensors"] and a["keys"] == b["keys"], name
    # expert.json differs only by the run directory it records.
    texts = [(lib / "experts" / name / "expert.json").read_text() for lib in (cmd["lib"], side["lib"])]
    assert texts[0].replace(str(cmd["run"]), "RUN") == texts[1].replace(str(side["run"]), "RUN"), name
  assert manifests[0]["backbone_fingerprint"] == manifests[1]["backbone_fingerprint"]


@pytest.mark.slow
def test_score_returns_the_commands_scores_as_arrays(walk):
  scores = walk["api"]["scores"]
  lines = [json.loads(line) for line in walk["cmd"]["scores"].read_text().splitlines()]
  assert scores.ids == ("a", 7) and scores.experts == tuple(sorted(TASKS))
  assert scores.scores.shape == (3, 2, 3) and scores.counts.shape == (2, 3)
  assert np.all(np.isneginf(scores.scores[:, 0, 2]))  # the first example has two choices
  for n, line in enumerate(lines):
    for e, name in enumerate(scores.experts):
      count = len(EXAMPLES[n]["choices"])
      np.testing.assert_allclose(scores.scores[e, n, :count], line["scores"][name], rtol=1e-6)
      assert scores.predictions()[e, n] == line["prediction"][name]
  assert set(scores.accuracy([0, 0]).values()) <= {0.0, 50.0, 100.0}


@pytest.mark.slow
def test_retrieve_and_merge_match_the_commands(walk):
  cmd, side = walk["cmd"], walk["api"]
  ranking = json.loads(cmd["rank"].read_text())
  assert side["selection"].ranking() == ranking["ranking"]
  assert side["selection"].computed_from["embedder"] == "bm25" and side["selection"].computed_from["queries"] == 32
  assert side["provenance"]["merged_from"] == [r["expert"] for r in ranking["ranking"][:2]]
  _assert_same_tensors(cmd["lib"] / "experts" / "top2", side["lib"] / "experts" / "top2")


@pytest.mark.slow
def test_evaluate_matches_eval_and_returns_a_table(walk):
  cmd, side = walk["cmd"], walk["api"]
  evaluation = side["evaluation"]
  names = sorted(TASKS) + ["top2"]
  assert list(evaluation.experts) == names
  reports = [json.loads((d / "results.json").read_text()) for d in (cmd["eval"], side["eval"])]
  for report in reports:
    report["run"].pop("library")
  assert reports[0] == reports[1]
  assert (cmd["eval"] / "results.md").read_bytes() == (side["eval"] / "results.md").read_bytes()
  assert evaluation.markdown() == (side["eval"] / "results.md").read_text()
  rows = evaluation.rows
  assert len(rows) == 12 * len(names) and {r["metric"] for r in rows} == {"accuracy"}
  for r in rows:
    assert r["value"] == next(t for t in evaluation.results if t.task == r["task"]).metrics[r["expert"]]["accuracy"]
  per_dataset = evaluation.per_dataset()
  assert {r["dataset"] for r in per_dataset} == {"nli", "coreference", "sentence_completion", "word_sense"}
  assert all(r["prompts"] == 3 for r in per_dataset)
  mean = evaluation.mean()
  assert mean["top2"] == pytest.approx(np.mean([r["value"] for r in rows if r["expert"] == "top2"]))
  # Without an output directory nothing is left behind, and the numbers are the same.
  again = api.evaluate(str(side["lib"]), "builtin_held_out", max_examples=4, progress=False)
  assert again.rows == rows


@pytest.mark.slow
def test_train_experts_with_python_values_equals_the_gin_recipe(walk):
  run = walk["root"] / "python_run"
  final = api.train_experts(str(run), TASKS, steps=2, config=api.model_config("models/t5_1_1_mini.gin"),
                            batch_size=2, input_length=32, target_length=8, learning_rate=1e-3, progress=False)
  assert sorted(final) == sorted(TASKS)
  for task in TASKS:
    _assert_same_tensors(walk["api"]["run"] / "experts" / task, run / "experts" / task)


@pytest.mark.slow
def test_the_api_refuses_what_the_commands_refuse(walk, capsys):
  lib = str(walk["api"]["lib"])
  with pytest.raises(score_command.InputError, match=r"examples\[1\]: field 'choices' must be a non-empty list"):
    api.score(lib, [EXAMPLES[0], {"inputs": "no choices"}])
  with pytest.raises(score_command.InputError, match="examples: expected a non-empty list"):
    api.score(lib, EXAMPLES[0])
  with pytest.raises(UserInputError, match="not a registered task or mixture") as raised:
    api.evaluate(lib, "no_such_task", max_examples=4)
  capsys.readouterr()
  assert cli.main(["eval", f"--library={lib}", "--task=no_such_task", f"--output_dir={walk['root'] / 'x'}"]) == 2
  assert str(raised.value) in capsys.readouterr().err
  with pytest.raises(UserInputError, match="already holds an expert of that name"):
    api.merge(lib, [TASKS[0]], "top2")
  with pytest.raises(UserInputError, match="needs top_k"):
    api.merge(lib, walk["api"]["selection"], "top3")
  with pytest.raises(UserInputError, match="weights"):
    api.merge(lib, TASKS[:2], "w", method="weighted")
  with pytest.raises(selection.SelectionError, match="exactly one of task=NAME"):
    api.select_experts(lib)
  with pytest.raises(UserInputError, match="pass a list of tasks and steps"):
    api.train_experts(str(walk["root"] / "never"), "builtin_sentiment_is_positive", steps=1)
  with pytest.raises(UserInputError, match="mesh: expected"):
    api.score(lib, EXAMPLES, mesh=8)
  assert not os.path.exists(walk["root"] / "never")


def test_select_experts_takes_raw_input_strings(tmp_path):
  """RoE from a handful of raw inputs, on a library of keys only (nothing is trained)."""
  from tests.helpers.library import make_expert
  library = api.open_library(str(tmp_path / "lib"), create=True)
  keys = {"film": [{"inputs": "a wonderful film, I loved it"}, {"inputs": "the actors were dull"}],
          "sport": [{"inputs": "the striker scored a goal"}, {"inputs": "the goalkeeper saved a penalty"}],
          "food": [{"inputs": "the soup was salty"}, {"inputs": "fresh bread and butter"}]}
  for name, rows in keys.items():
    library.add(make_expert(str(tmp_path / "experts"), name, 0), keys=rows)
  chosen = api.select_experts(library, queries=["the goalkeeper saved it", "a striker and a goal"],
                              embedder="bm25")
  assert chosen.top(1) == ["sport"] and chosen.ranking()[0] == {"expert": "sport", "votes": 2}
  assert chosen.computed_from["source"] == "queries" and chosen.computed_from["queries"] == 2


def _public_names():
  return sorted(n for n, v in vars(api).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == api.__name__)


def test_every_public_name_has_a_docstring_with_an_example():
  assert _public_names() == sorted(api.__all__)
  for name in api.__all__:
    doc = inspect.getdoc(getattr(api, name)) or ""
    assert len(doc.splitlines()) >= 2, name
    if inspect.isfunction(getattr(api, name)):  # a function's doc ends with an example using it
      assert re.search(rf"^    .*api\.{name}\(", doc, re.M), f"{name}: no example `api.{name}(...)` in its docstring"


def test_every_public_name_is_documented_in_docs_api_md():
  text = open(os.path.join(REPO, "docs", "API.md"), encoding="utf-8").read()
  headings = re.findall(r"^### `api\.(\w+)", text, re.M)
  assert sorted(headings) == sorted(api.__all__)
  for name in api.__all__:
    section = text.split(f"### `api.{name}")[1].split("\n### ")[0]
    if inspect.isfunction(getattr(api, name)):
      assert re.search(r"```python\n.*\n.*\n```", section), f"docs/API.md: {name} has no two-line example"


def test_help_lists_the_workflow_and_import_stays_light():
  text = pydoc.render_doc(elm_jax) + pydoc.render_doc(api)
  for step in ("api.train_experts(", "api.add_experts(", "api.score(", "api.select_experts(", "api.merge(",
               "api.evaluate("):
    assert step in pydoc.render_doc(elm_jax) and step in pydoc.render_doc(api), step
  assert "notebooks/quickstart.ipynb" in text
  out = subprocess.run([sys.executable, "-c", "import sys, elm_jax; print(sorted(m for m in ('jax', 'tensorflow', "
                        "'seqio') if m in sys.modules))"], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
