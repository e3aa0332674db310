"""`elm-jax eval` as a sweep (`evaluation/sweep.py`): a rerun skips finished units and writes
the same bytes; an added expert is computed alone; shards assembled equal one job byte for
byte, and a missing or mismatched shard is refused naming the unit. Each command runs in this
process on a library of three one-layer experts over the 12-task built-in held-out mixture."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.hostile.harness import run_command, train_args

TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of"]
MIXTURE = "builtin_held_out"  # 12 rank-classification tasks
REPORTS = ("results.json", "results.csv", "results.md")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A run of three experts, a library of the first two, and an uninterrupted sweep over it."""
  root = tmp_path_factory.mktemp("sweep")
  assert run_command(train_args(root / "run", TASKS)) == 0
  lib = root / "lib"
  for task in TASKS[:2]:
    assert run_command(["library", "add", f"--library={lib}", "--keys=none", str(root / "run" / "experts" / task)]) == 0
  assert run_command(_eval(lib, root / "reference")) == 0
  return root


def _eval(lib, out, *extra) -> list[str]:
  return ["eval", f"--library={lib}", f"--task={MIXTURE}", f"--output_dir={out}", "--max_examples=4",
          "--batch_size=4", "--no_progress", *extra]


def _reports(out) -> dict[str, bytes]:
  found = {name: open(os.path.join(out, name), "rb").read() for name in REPORTS}
  for name in sorted(os.listdir(os.path.join(out, "predictions"))):
    found[f"predictions/{name}"] = open(os.path.join(out, "predictions", name), "rb").read()
  return found


def _units_computed(out) -> list[dict]:
  lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
  return [r for r in lines if r["event"] == "unit"]


def test_reference_sweep_wrote_one_unit_per_task(world):
  ref = world / "reference"
  units = _units_computed(ref)
  assert len(units) == 12 and [u["unit"] for u in units] == list(range(12))
  assert len(_reports(ref)) == 3 + 12
  assert json.load(open(ref / "results.json"))["run"]["experts"] == sorted(TASKS[:2])


def test_resumed_sweep_skips_finished_units_and_writes_the_same_bytes(world, capsys):
  out = world / "resumed"
  shutil.copytree(world / "reference" / "units", out / "units")
  for name in sorted(os.listdir(out / "units"))[::2]:  # half the units were never finished
    shutil.rmtree(out / "units" / name)
  capsys.readouterr()
  assert run_command(_eval(world / "lib", out)) == 0
  assert "6 of 12 unit(s) already done, skipped; 6 to compute" in capsys.readouterr().err
  assert len(_units_computed(out)) == 6
  assert _reports(out) == _reports(world / "reference")


def test_an_added_expert_is_computed_alone(world, tmp_path):
  lib, out = tmp_path / "lib", tmp_path / "out"
  shutil.copytree(world / "lib", lib)
  shutil.copytree(world / "reference", out)
  os.remove(out / "log.jsonl")
  assert run_command(["library", "add", f"--library={lib}", "--keys=none", str(world / "run" / "experts" / TASKS[2])]) == 0
  assert run_command(_eval(lib, out)) == 0
  units = _units_computed(out)
  assert len(units) == 12 and all(u["experts"] == [TASKS[2]] for u in units)
  report = json.load(open(out / "results.json"))
  assert report["run"]["experts"] == sorted(TASKS)
  # The old experts' results are the reference's, untouched.
  reference = json.load(open(world / "reference" / "results.json"))
  for before, after in zip(reference["tasks"], report["tasks"]):
    assert all(after["metrics"][e] == before["metrics"][e] for e in TASKS[:2])


def test_changed_options_recompute_every_unit(world, tmp_path, capsys):
  out = tmp_path / "out"
  shutil.copytree(world / "reference", out)
  capsys.readouterr()
  assert run_command(_eval(world / "lib", out, "--max_input_length=64")) == 0
  assert "0 of 12 unit(s) already done, skipped; 12 to compute" in capsys.readouterr().err


def test_shards_assembled_equal_one_job(world, tmp_path, capsys):
  out = tmp_path / "out"
  for i in range(3):
    assert run_command(_eval(world / "lib", out, f"--shard={i}/3")) == 0
    assert not (out / "results.json").exists()  # a shard writes no report
  assert sorted(u["unit"] for u in _units_computed(out)) == list(range(12))
  assert run_command(_eval(world / "lib", out, "--assemble")) == 0
  assert _reports(out) == _reports(world / "reference")


def test_a_missing_shard_is_refused_naming_the_unit(world, tmp_path, capsys):
  out = tmp_path / "out"
  for i in (0, 2):
    assert run_command(_eval(world / "lib", out, f"--shard={i}/3")) == 0
  capsys.readouterr()
  assert run_command(_eval(world / "lib", out, "--assemble")) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and "unit 1 (task builtin_coreference_replace_pronoun_score_eval" in errors[0]
  assert "is missing from" in errors[0] and "i = 1 mod N" in errors[0]
  assert not (out / "results.json").exists()


def test_a_shard_made_with_other_inputs_is_refused(world, tmp_path, capsys):
  out = tmp_path / "out"
  for i in range(3):
    assert run_command(_eval(world / "lib", out, f"--shard={i}/3", *(["--max_input_length=64"] if i == 1 else []))) == 0
  capsys.readouterr()
  assert run_command(_eval(world / "lib", out, "--assemble")) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert len(errors) == 1 and "unit 1 (task" in errors[0]
  assert "made with other inputs (max_input_length: 64 there, 512 now)" in errors[0]


@pytest.mark.parametrize("argv, message", [
    (["--shard=3/3"], r"--shard=3/3: expected i/N with 0 <= i < N"),
    (["--shard=a"], r"--shard=a: expected i/N"),
    (["--shard=0/2", "--assemble"], r"--shard and --assemble"),
    (["--mesh=data:2,experts:4"], r"--mesh=data:2,experts:4: expected AXIS:SIZE pairs"),
    (["--mesh=data:16"], r"MeshConfig .*needs 16 devices, but 8 are available"),
])
def test_bad_sweep_flags_are_refused(world, tmp_path, capsys, argv, message):
  import re
  capsys.readouterr()
  assert run_command(_eval(world / "lib", tmp_path / "out", *argv)) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert len(errors) == 1 and re.search(message, errors[0]), errors
  assert not (tmp_path / "out").exists()


def test_a_directory_eval_did_not_write_is_refused(world, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "thesis.tex").write_text("x")
  assert run_command(_eval(world / "lib", out)) == 2
  assert "holds files that `elm-jax eval` did not write (thesis.tex)" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["thesis.tex"]


def test_run_file_binds_the_flags(world, tmp_path):
  out = tmp_path / "out"
  argv = ["eval", "--gin_file=runs/eval.gin", f"--gin.LIBRARY='{world / 'lib'}'", f"--gin.TASK='{MIXTURE}'",
          f"--gin.OUTPUT_DIR='{out}'", "--gin.MAX_EXAMPLES=4", "--gin.BATCH_SIZE=4", "--no_progress"]
  assert run_command(argv) == 0
  assert _reports(out) == _reports(world / "reference")
