"""Experts with different plans in one vmapped program: 3 experts of 2, 5 and 9 steps (and their
own learning rates, with dropout on) end where each trained alone for its own steps ends, an
expert that has finished stays bit for bit as after its last step, and a run killed in the
middle and resumed keeps both."""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from elm_jax.checkpoints import expert_files
from elm_jax.models.t5 import init_params
from elm_jax.training import train_step as ts
from elm_jax.training import trainer
from tasks import prompted
from tests.helpers.trees import assert_trees_close, assert_trees_equal

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")
WORDS = "the cat dog sat ran on a mat big small red blue".split()
NAMES = ("short", "middle", "long")
STEPS = (2, 5, 9)
RATES = (3e-3, 1e-3, 2e-3)
pytestmark = pytest.mark.slow  # 4 small training runs


def _rows(offset):
  def rows_fn(split):
    rng = np.random.default_rng(offset)
    return [{"inputs": " ".join(rng.choice(WORDS, 5)), "targets": " ".join(rng.choice(WORDS, 2))}
            for _ in range(48)]
  return rows_fn


@pytest.fixture(scope="module")
def setup(tiny_config):
  vocab = seqio.SentencePieceVocabulary(SPM)
  for i, name in enumerate(NAMES):
    prompted.register_prompted_task(f"test_plans_{name}", _rows(i), vocab, score_eval=False)
  config = tiny_config.replace(dropout_rate=0.1)  # masks drawn per expert, from its own seed
  return config, nn.unbox(init_params(config, jax.random.PRNGKey(0)))


def _config(model_dir, indices, **kw):
  return trainer.TrainConfig(
      model_dir=str(model_dir), expert_tasks=tuple(f"test_plans_{NAMES[i]}" for i in indices),
      expert_names=tuple(NAMES[i] for i in indices), steps=max(STEPS[i] for i in indices),
      expert_steps=tuple(STEPS[i] for i in indices), expert_learning_rates=tuple(RATES[i] for i in indices),
      batch_size=4, input_length=16, target_length=8, save_every=1, keep=20, log_every=1, **kw)


def _exported(model_dir):
  return {name: expert_files.load_expert(str(model_dir / "experts" / name)) for name in NAMES
          if (model_dir / "experts" / name).is_dir()}


def _checkpointed_params(model_dir, step):
  with ocp.CheckpointManager(str(model_dir / "checkpoints")) as manager:
    return manager.restore(step)["params"]


@pytest.fixture(scope="module")
def group_run(setup, tmp_path_factory):
  config, backbone = setup
  directory = tmp_path_factory.mktemp("group")
  trainer.train_experts(_config(directory, range(3)), config, backbone, progress=False,
                        optimizer_config=ts.OptimizerConfig(learning_rate=1.0))
  return directory


def test_each_expert_ends_where_it_ends_alone(setup, group_run, tmp_path):
  config, backbone = setup
  together = _exported(group_run)
  for i, name in enumerate(NAMES):
    alone_dir = tmp_path / name
    trainer.train_experts(_config(alone_dir, [i]), config, backbone, progress=False,
                          optimizer_config=ts.OptimizerConfig(learning_rate=1.0))
    params, meta = _exported(alone_dir)[name]
    assert together[name][1].steps == meta.steps == STEPS[i]
    assert together[name][1].training_config["plan"] == {"steps": STEPS[i], "learning_rate": RATES[i]}
    # Two programs of ours (E=3 against E=1): the same per-expert arithmetic, vmapped at
    # another width; float32 rounding may differ. Adam divides by the root of the squared
    # gradient, so a component whose gradient is near 0 turns a rounding difference into a
    # visible one (up to about 2e-6 here, after 9 steps at rates of 1e-3).
    assert_trees_close(together[name][0], params, rtol=1e-6, atol=5e-6)


def test_finished_experts_stay_bitwise_unchanged(group_run):
  """Checkpoints after every step: expert e's tensors after its last step are the same bits at
  every later step of the group, while the longer experts still change."""
  final = {s: _checkpointed_params(group_run, s) for s in range(1, 10)}
  for e, steps in enumerate(STEPS):
    last = jax.tree_util.tree_map(lambda x: np.asarray(x)[e], final[steps])
    for later in range(steps + 1, 10):
      assert_trees_equal(jax.tree_util.tree_map(lambda x: np.asarray(x)[e], final[later]), last)
    if steps > 1:  # and it did change up to its last step
      before = jax.tree_util.tree_map(lambda x: np.asarray(x)[e], final[steps - 1])
      assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                          jax.tree_util.tree_leaves(last)))


def test_kill_and_resume_keeps_every_plan(setup, group_run, tmp_path):
  config, backbone = setup

  def kill_at_4(step):
    if step == 4:  # after the short expert has finished, before the others have
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    trainer.train_experts(_config(tmp_path, range(3)), config, backbone, progress=False, on_step=kill_at_4,
                          optimizer_config=ts.OptimizerConfig(learning_rate=1.0))
  trainer.train_experts(_config(tmp_path, range(3)), config, backbone, progress=False,
                        optimizer_config=ts.OptimizerConfig(learning_rate=1.0))
  resumed, uninterrupted = _exported(tmp_path), _exported(group_run)
  for name in NAMES:  # exact: the same program, state restored bit for bit
    assert_trees_equal(resumed[name][0], uninterrupted[name][0])
    assert resumed[name][1].steps == uninterrupted[name][1].steps


def test_a_plan_longer_than_the_group_is_refused(setup, tmp_path):
  config, backbone = setup
  bad = trainer.TrainConfig(model_dir=str(tmp_path), expert_tasks=("test_plans_short",), steps=3,
                            expert_steps=(5,), batch_size=4, input_length=16, target_length=8)
  with pytest.raises(trainer.TrainingError, match="the longest expert plan has 5 steps"):
    trainer.train_experts(bad, config, backbone, progress=False)
