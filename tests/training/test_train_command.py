"""`elm-jax train` from gin run files, as a user runs it."""

import json
import pathlib

import numpy as np
import seqio

from elm_jax.commands import cli, gin_utils
from tasks import prompted

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")


def _register():
  def rows(split):
    rng = np.random.default_rng(0)
    return [{"inputs": "copy: " + " ".join(rng.choice(["a", "b", "c"], 3)), "targets": "a"} for _ in range(32)]
  prompted.register_prompted_task("test_cmd_copy", rows, seqio.SentencePieceVocabulary(SPM), score_eval=False)
  prompted.register_prompted_task("test_cmd_copy2", rows, seqio.SentencePieceVocabulary(SPM), score_eval=False)


def test_train_two_experts_from_the_run_file(tmp_path, capsys):
  _register()
  code = cli.main([
      "train", "--no_progress", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/train_experts.gin",
      f"--gin.MODEL_DIR='{tmp_path}'", "--gin.EXPERT_TASKS=['test_cmd_copy', 'test_cmd_copy2']",
      "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.INPUT_LENGTH=16", "--gin.TARGET_LENGTH=4"])
  assert code == 0, capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["test_cmd_copy", "test_cmd_copy2"]
  meta = json.loads((tmp_path / "experts" / "test_cmd_copy" / "expert.json").read_text())
  assert meta["steps"] == 2 and meta["expert_config"]["kind"] == "adapter"
  assert meta["training_config"]["optimizer"]["learning_rate"] == 1e-4


def test_multitask_run_file_parses_and_overrides():
  gin_utils.parse_gin(gin_utils.GinFlags(files=["models/t5_1_1_tiny.gin", "runs/train_multitask.gin"],
                                         bindings=["MODEL_DIR = '/tmp/x'"]))
  import gin
  assert gin.query_parameter("%EXPERT_TASKS") == ["t0_train"]
  assert gin.query_parameter("train_step.OptimizerConfig.name") == "adafactor"
  assert gin.query_parameter("%EXPERT_KIND") == "full"
  assert str(gin.query_parameter("adapters.ExpertConfig.kind")) == "%EXPERT_KIND"


def test_train_without_a_run_file(capsys):
  gin_utils.parse_gin(gin_utils.GinFlags())
  assert cli.main(["train"]) == 2
  assert "pass a run file" in capsys.readouterr().err


def test_eight_builtin_experts_at_once(tmp_path, capsys):
  """The issue's check: `elm-jax train` trains 8 built-in-suite experts at once and writes 8
  expert directories (a few steps here; the run file's default is 100)."""
  code = cli.main([
      "train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin",
      "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{tmp_path}'",
      "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.INPUT_LENGTH=64"])
  assert code == 0, capsys.readouterr().err
  experts = sorted(p.name for p in (tmp_path / "experts").iterdir())
  assert len(experts) == 8 and all(e.startswith("builtin_") for e in experts)
  for e in experts:
    assert (tmp_path / "experts" / e / "tensors.safetensors").is_file()


def test_task_vocabulary_larger_than_the_model(tmp_path, capsys):
  code = cli.main([
      "train", "--no_progress", "--gin_file=models/t5_1_1_tiny.gin",
      "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{tmp_path}'",
      "--gin.TRAIN_STEPS=1"])
  assert code == 2
  assert "more than the model's vocab_size 320" in capsys.readouterr().err
