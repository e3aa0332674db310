"""`elm-jax route` and `api.route` on a trained library: every example forced to one expert gives
that expert's accuracy from `elm-jax score`'s code, the run file binds the flags, and a
refusal is one line with exit status 2."""

import json

import gin
import numpy as np
import pytest

from elm_jax import api
from elm_jax.commands import cli
from tests.hostile.harness import TASKS, train_args

TASK = "builtin_nli_can_we_infer_score_eval"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
  root = tmp_path_factory.mktemp("route")
  assert cli.main(train_args(root / "run")) == 0
  gin.clear_config()
  assert cli.main(["library", "add", f"--library={root / 'lib'}", str(root / "run")]) == 0
  gin.clear_config()
  return root / "lib"


def _route_forced(lib, task, expert, out, examples):
  """`elm-jax route --method=forced` of `examples` examples of `task` -> its --output record."""
  assert cli.main(["route", f"--library={lib}", f"--task={task}", "--method=forced", f"--expert={expert}",
                   f"--max_examples={examples}", "--max_input_length=32", "--max_target_length=8",
                   "--batch_size=4", f"--output={out}"]) == 0
  gin.clear_config()
  return json.loads(out.read_text())


def test_forced_route_is_the_experts_own_accuracy(lib, tmp_path, capsys):
  expert = TASKS[0]
  record = _route_forced(lib, TASK, expert, tmp_path / "routed.json", 8)
  rows = api.task_examples(TASK, max_examples=8)
  scores = api.score(lib, rows, experts=[expert], max_input_length=32, max_target_length=8, batch_size=4)
  assert record["predictions"] == scores.predictions()[0].tolist()
  assert record["accuracy"] == pytest.approx(scores.accuracy([r["label"] for r in rows])[expert])
  assert record["method"] == "forced" and record["computed_from"]["expert"] == expert
  uniform = api.route(lib, TASK, method="uniform", max_examples=8, max_input_length=32, max_target_length=8,
                      batch_size=4)
  assert uniform.scores.shape[0] == 8 and np.isfinite(uniform.accuracy)


def test_run_file_binds_the_method_and_refusals_are_one_line(lib, capsys):
  code = cli.main(["route", "--gin_file=runs/route.gin", f"--gin.LIBRARY='{lib}'", f"--gin.TASK='{TASK}'",
                   "--gin.METHOD='forced'", "--max_examples=4"])
  gin.clear_config()
  assert code == 2
  assert capsys.readouterr().err.strip().endswith(
      "elm-jax route: error: method 'forced': name the expert every example is routed to (expert=NAME)")


GENERATION_TASK = "builtin_title_generation_write_title"
EVAL_FLAGS = ["--max_examples=6", "--max_input_length=32", "--max_target_length=8", "--batch_size=4",
              "--no_progress"]


def _eval(lib, out, task, *extra):
  code = cli.main(["eval", f"--library={lib}", f"--task={task}", f"--output_dir={out}", *EVAL_FLAGS, *extra])
  gin.clear_config()
  assert code == 0
  return json.loads((out / "results.json").read_text())


def _predictions(out, task):
  return [json.loads(line)["predictions"] for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", [TASK, GENERATION_TASK])
def test_eval_routing_is_a_column_of_the_resumable_sweep(lib, tmp_path, capsys, task):
  """`eval --routing=forced,uniform`: one column a method; the forced column predicts what the
  expert alone predicts (rank classification, and decoding for a generation task); a rerun
  skips the unit and writes the same bytes; another --top_k recomputes the routed columns."""
  expert = TASKS[0]
  alone = _eval(lib, tmp_path / "alone", task, f"--experts={expert}")
  routed_dir = tmp_path / "routed"
  flags = ("--routing=forced,uniform", f"--expert={expert}")
  routed = _eval(lib, routed_dir, task, *flags)
  assert list(routed["summary"]) == ["routed:forced", "routed:uniform"]
  assert routed["run"]["routing"]["methods"] == ["forced", "uniform"]
  [alone_task], [routed_task] = alone["tasks"], routed["tasks"]
  assert routed_task["metrics"]["routed:forced"] == alone_task["metrics"][expert]
  forced = [p["routed:forced"] for p in _predictions(routed_dir, task)]
  assert forced == [p[expert] for p in _predictions(tmp_path / "alone", task)]
  before = {name: (routed_dir / name).read_bytes() for name in ("results.json", "results.csv", "results.md")}
  capsys.readouterr()
  _eval(lib, routed_dir, task, *flags)
  assert "eval: 1 of 1 unit(s) already done, skipped; 0 to compute" in capsys.readouterr().err
  assert {name: (routed_dir / name).read_bytes() for name in before} == before
  _eval(lib, routed_dir, task, *flags, "--top_k=2")
  assert "eval: 0 of 1 unit(s) already done, skipped; 1 to compute" in capsys.readouterr().err
  if task == GENERATION_TASK:  # `route` decodes a task without answer choices
    record = _route_forced(lib, task, expert, tmp_path / "routed.json", 6)
    assert record["predictions"] == forced and record["accuracy"] is None
    assert record["metrics"] == pytest.approx(alone_task["metrics"][expert])
  if task == TASK:  # the API runs the same sweep
    table = api.evaluate(lib, task, routing=["forced"], routing_options={"expert": expert}, max_examples=6,
                         max_input_length=32, max_target_length=8, batch_size=4, progress=False)
    assert table.mean() == {"routed:forced": pytest.approx(alone_task["metrics"][expert]["accuracy"])}
    with pytest.raises(api.UserInputError, match=r"routing options: unknown \['topk'\]"):
      api.evaluate(lib, task, routing=["arrow"], routing_options={"topk": 2}, max_examples=6)


def test_eval_run_file_binds_routing(lib, tmp_path, capsys):
  """runs/eval.gin's ROUTING and TOP_K macros stand for --routing and --top_k; a bad ROUTING is
  one line naming the macro."""
  out = tmp_path / "gin"
  code = cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.LIBRARY='{lib}'", f"--gin.TASK='{TASK}'",
                   f"--gin.OUTPUT_DIR='{out}'", "--gin.ROUTING='uniform'", "--gin.TOP_K=2", *EVAL_FLAGS])
  gin.clear_config()
  assert code == 0
  record = json.loads((out / "results.json").read_text())
  assert list(record["summary"]) == ["routed:uniform"] and record["run"]["routing"]["top_k"] == 2
  code = cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.LIBRARY='{lib}'", f"--gin.TASK='{TASK}'",
                   f"--gin.OUTPUT_DIR='{tmp_path / 'bad'}'", "--gin.ROUTING='arow'", *EVAL_FLAGS])
  gin.clear_config()
  assert code == 2 and "error: --gin.ROUTING='arow': expected method names among" in capsys.readouterr().err


def test_eval_routing_refuses_an_unknown_method(lib, tmp_path, capsys):
  code = cli.main(["eval", f"--library={lib}", f"--task={TASK}", f"--output_dir={tmp_path / 'o'}", "--routing=arow"])
  gin.clear_config()
  assert code == 2 and not (tmp_path / "o").exists()
  assert ("--routing: expected method names among uniform, arrow, phatgoose, retrieval, forced"
          in capsys.readouterr().err)
