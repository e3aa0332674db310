"""`elm-jax plan`: the real train step and scorer lowered on abstract arrays for a mesh, per-device
figures, and a recipe that does not fit refused with what to change."""

import io
import math
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

from elm_jax import partitioning, planning
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.training import plans, run
from elm_jax.training import train_step as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _layout(config, num_experts=8, batch_size=4, mesh=partitioning.MeshConfig(data=2, expert=4)):
  shape = run.StepShape((0,), num_experts, batch_size, 32, 8, config, ts.OptimizerConfig())
  return run.RunLayout(f"{num_experts} experts", (shape,), ExpertConfig(), mesh, None, num_experts)


def test_saved_activation_bytes_counts_residuals_not_inputs():
  """sum(sin(p * x)) keeps cos(p * x) (n float32) for its gradient in p; p and x are inputs."""
  n = 1000
  p = jax.ShapeDtypeStruct((n,), jnp.float32)
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  assert planning.saved_activation_bytes(lambda p, x: jnp.sin(p * x).sum(), p, x) == 4 * n
  # Two layers keep both layers' residuals: cos(p * x) and cos(p * sin(p * x)), and sin(p * x).
  assert planning.saved_activation_bytes(lambda p, x: jnp.sin(p * jnp.sin(p * x)).sum(), p, x) == 3 * 4 * n


@pytest.fixture(scope="module")
def tiny_plan(tiny_config):
  out = io.StringIO()
  made = planning.plan_run(_layout(tiny_config.replace(dropout_rate=0.1)),
                           planning.PlanRequest(score_batch_size=8), stream=out)
  return made, out.getvalue()


def test_plan_figures_are_the_arrays_each_device_holds(tiny_config, tiny_plan):
  made, text = tiny_plan
  train, scorer = made
  frozen, expert = EncoderDecoderModel.build(tiny_config, ExpertConfig()).abstract_params()
  expert_bytes = planning.tree_bytes(expert)
  # 8 experts over a 4-way expert axis: 2 experts' adapters per device, the backbone whole.
  assert train.expert_parameters == 2 * expert_bytes
  assert train.parameters == planning.tree_bytes(frozen) + 2 * expert_bytes
  assert train.gradients == 2 * expert_bytes
  assert train.optimizer_state >= 2 * train.expert_parameters  # Adam's two moments, and a count
  # Each device holds 2 experts x 2 of the 4 rows: [2, 2, 32] encoder + 3 x [2, 2, 8] decoder int32.
  assert train.batch == 4 * (2 * 2 * 32 + 3 * 2 * 2 * 8)
  assert train.saved_activations > 0 and train.flops > 0 and scorer.flops > 0
  assert train.estimate >= train.compiled_arguments + train.saved_activations
  assert "train step of group(s) 0" in text and "scorer" in text and "fits:" in text


def test_plan_flops_are_per_device(tiny_config, tiny_plan):
  """Halving the devices each expert is split over doubles each device's share of the FLOPs."""
  train = tiny_plan[0][0]
  wider = planning.plan_training(tiny_config.replace(dropout_rate=0.1), ExpertConfig(), ts.OptimizerConfig(),
                                 partitioning.Partitioner(partitioning.MeshConfig(data=1, expert=8)),
                                 num_experts=8, batch_size=4, input_length=32, target_length=8)
  # 1 expert x 4 rows per device against 2 experts x 2 rows: the same work per device.
  assert math.isclose(wider.flops, train.flops, rel_tol=0.05), (wider.flops, train.flops)


def test_a_group_the_mesh_cannot_split_is_refused_with_a_mesh_that_can(tiny_config):
  with pytest.raises(planning.PlanError) as e:
    planning.plan_run(_layout(tiny_config, num_experts=3, batch_size=4), planning.PlanRequest(score=False),
                      stream=io.StringIO())
  message = str(e.value)
  assert "the group's experts (3) cannot be split over the mesh's 'expert' axis of 4 devices" in message
  # No mesh of all 8 devices splits 3 experts x 4 rows; the largest slice that does is 2 x 3.
  assert "run this group on a slice of 6 devices (MeshConfig.data = 2, expert = 3)" in message
  assert planning.layouts(8, 2, 8) == [(1, 8), (2, 4)]


def test_the_recipe_layout_covers_every_group():
  group = plans.recipe_group("prompt", 0, 8)
  layout = run.run_layout(group, None, model_config=run.T5Config(), batch_size=8, input_length=256,
                          target_length=128, expert_config=ExpertConfig(), optimizer_config=ts.OptimizerConfig(),
                          mesh_config=None, logical_axis_rules=None, all_shapes=True)
  groups = plans.recipe_groups("prompt", 8)
  assert sorted(g for s in layout.shapes for g in s.groups) == list(range(len(groups)))
  assert layout.recipe_experts == 296
  for shape in layout.shapes:
    for g in shape.groups:
      assert (len(groups[g]), groups[g][0].batch_size, groups[g][0].input_length) == (
          shape.num_experts, shape.batch_size, shape.input_length)
  assert all(s.model_config.dropout_rate == 0.1 for s in layout.shapes)


@pytest.mark.slow
def test_plan_command_refuses_a_recipe_that_does_not_fit():
  """The command a user runs: a run that needs more than the chip's memory exits 2 and says what
  to change, with figures."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, "-m", "elm_jax.commands.cli", "plan", "--devices=8", "--no_scoring",
          "--memory_gib=0.03", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/train_experts.gin",
          "--gin.EXPERT_TASKS=['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']", "--gin.BATCH_SIZE=4",
          "--gin.MESH_CONFIG=@partitioning.MeshConfig()", "--gin.partitioning.MeshConfig.expert=4"]
  result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "8 devices as 2 data x 4 expert x 1 model" in result.stdout
  assert "DOES NOT FIT" in result.stdout
  err = result.stderr
  assert "elm-jax plan: error: 1 program(s) of this run do not fit 8 x TPU v4-like chip" in err
  assert "T5Config.remat_policy = 'minimal'" in err and "T5Config.remat_policy = 'full'" in err
  assert "partitioning.MeshConfig.expert = 8" in err and "GROUP_SIZE = 4" in err
  assert "Traceback" not in err
  # The same run fits a real TPU v4: exit 0.
  ok = subprocess.run([a for a in args if not a.startswith("--memory_gib")], capture_output=True, text=True,
                      env=env, timeout=300, cwd=REPO)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "fits: every program above fits a TPU v4" in ok.stdout


def test_train_refuses_a_mesh_that_cannot_split_the_group_before_loading(tmp_path):
  """The trainer checks the mesh before it loads a backbone or reads data."""
  with pytest.raises(run.trainer.TrainingError, match="3 experts cannot be split over the mesh's 'expert' axis of 2"):
    run.train(str(tmp_path / "m"), ["a", "b", "c"], 1, model_config=run.T5Config(), batch_size=4,
              mesh_config=partitioning.MeshConfig(data=4, expert=2), backbone_checkpoint="/nonexistent")
  assert not os.path.exists(tmp_path / "m")
