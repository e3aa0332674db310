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


def test_forced_route_is_the_experts_own_accuracy(lib, tmp_path, capsys):
  expert = TASKS[0]
  out = tmp_path / "routed.json"
  assert cli.main(["route", f"--library={lib}", f"--task={TASK}", "--method=forced", f"--expert={expert}",
                   "--max_examples=8", "--max_input_length=32", "--max_target_length=8", "--batch_size=4",
                   f"--output={out}"]) == 0
  gin.clear_config()
  record = json.loads(out.read_text())
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
