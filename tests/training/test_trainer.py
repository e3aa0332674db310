"""The trainer end to end on tiny SeqIO tasks: exported experts, kill-and-resume equals an
uninterrupted run (bitwise on CPU), a damaged latest checkpoint falls back, NaN stops the run."""

import glob
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from tests.helpers.trees import assert_trained_params_close, assert_trees_equal
from elm_jax.checkpoints import expert_files
from elm_jax.models.t5 import init_params
from elm_jax.training import inputs, trainer
from tests.helpers import word_tasks



@pytest.fixture(scope="module")
def setup(tiny_config):
  word_tasks.register("test_trainer")
  backbone = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  return tiny_config, backbone


def _config(model_dir, steps=6, **kw):
  return trainer.TrainConfig(model_dir=str(model_dir), expert_tasks=("test_trainer_reverse", "test_trainer_first"),
                             steps=steps, batch_size=4, input_length=16, target_length=8,
                             save_every=2, log_every=2, **kw)


def _experts(model_dir):
  out = {}
  for d in sorted(glob.glob(os.path.join(model_dir, "experts", "*"))):
    params, meta = expert_files.load_expert(d)
    out[meta.name] = params
  return out


def test_trains_and_exports_every_expert(setup, tmp_path):
  model_config, backbone = setup
  final = trainer.train_experts(_config(tmp_path), model_config, backbone, progress=False)
  assert set(final) == {"test_trainer_reverse", "test_trainer_first"}
  experts = _experts(tmp_path)
  assert set(experts) == set(final)
  meta = json.load(open(tmp_path / "experts" / "test_trainer_first" / "expert.json"))
  assert meta["steps"] == 6 and meta["backbone_fingerprint"] == expert_files.backbone_fingerprint(backbone)
  log = [json.loads(l) for l in open(tmp_path / "train_log.jsonl")]
  assert [r["step"] for r in log] == [2, 4, 6] and set(log[-1]["experts"]) == set(final)
  seen = [r["experts"]["test_trainer_first"]["tokens_seen"] for r in log]
  assert seen[0] > 0 and seen == sorted(seen) and seen[-1] == final["test_trainer_first"]["tokens_seen"]
  assert glob.glob(str(tmp_path / "tensorboard" / "test_trainer_first" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
  model_config, backbone = setup
  trainer.train_experts(_config(tmp_path / "a"), model_config, backbone, progress=False)

  def kill_at_5(step):
    if step == 5:
      raise KeyboardInterrupt  # killed between the checkpoints at 4 and 6
  with pytest.raises(KeyboardInterrupt):
    trainer.train_experts(_config(tmp_path / "b"), model_config, backbone, on_step=kill_at_5, progress=False)
  assert not (tmp_path / "b" / "experts").exists()
  trainer.train_experts(_config(tmp_path / "b"), model_config, backbone, progress=False)
  a, b = _experts(tmp_path / "a"), _experts(tmp_path / "b")
  assert set(a) == set(b)
  for name in a:
    assert_trees_equal(b[name], a[name])  # exact: same program, state restored bitwise


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back(setup, tmp_path, capsys):
  model_config, backbone = setup
  trainer.train_experts(_config(tmp_path / "a"), model_config, backbone, progress=False)

  def kill_at_5(step):
    if step == 5:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    trainer.train_experts(_config(tmp_path / "b"), model_config, backbone, on_step=kill_at_5, progress=False)
  latest = tmp_path / "b" / "checkpoints" / "4"
  for f in latest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  trainer.train_experts(_config(tmp_path / "b"), model_config, backbone, progress=False)
  assert "checkpoint at step 4 is unreadable" in capsys.readouterr().err
  a, b = _experts(tmp_path / "a"), _experts(tmp_path / "b")
  assert set(a) == set(b)
  for name in a:
    assert_trees_equal(b[name], a[name])  # exact: same program, state restored bitwise


def test_nan_stops_naming_expert_and_step(setup, tmp_path):
  """A NaN learning rate poisons every expert after the first update: the loss of step 2 is NaN."""
  model_config, backbone = setup
  from elm_jax.training import train_step as ts
  with pytest.raises(trainer.TrainingError,
                     match=r"expert 'test_trainer_reverse' \(test_trainer_reverse\) has a non-finite "
                           r"loss at step 2; saved the last good state \(step 1\)"):
    trainer.train_experts(_config(tmp_path), model_config, backbone, progress=False,
                          optimizer_config=ts.OptimizerConfig(learning_rate=float("nan"), schedule="constant"))
  assert (tmp_path / "checkpoints" / "1").is_dir()

def test_unknown_task(setup, tmp_path):
  model_config, backbone = setup
  config = trainer.TrainConfig(model_dir=str(tmp_path), expert_tasks=("no_such_task",), steps=1,
                               batch_size=2)
  with pytest.raises(trainer.TrainingError, match="'no_such_task' is not a registered SeqIO task"):
    trainer.train_experts(config, model_config, backbone, progress=False)


@pytest.mark.slow
def test_sharded_trainer_equals_single_device(setup, tmp_path):
  """The trainer with a (data=2, expert=2, model=2) partitioner on 8 fake devices writes the same
  experts as without one."""
  from elm_jax import partitioning
  from elm_jax.training import train_step as ts
  model_config, backbone = setup
  trainer.train_experts(_config(tmp_path / "a", steps=2), model_config, backbone, progress=False)
  part = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=2, model=2))
  trainer.train_experts(_config(tmp_path / "b", steps=2), model_config, backbone, progress=False,
                        partitioner=part)
  a, b = _experts(tmp_path / "a"), _experts(tmp_path / "b")
  # Two code paths of ours, not exact (partitioned sums): see assert_trained_params_close. Worst
  # entry here 6e-8 (one ulp of a norm scale ~1); summed_lr: default lr 1e-4 decaying over 2 steps.
  summed_lr = sum(float(ts.learning_rate_schedule(ts.OptimizerConfig(), 2)(i)) for i in range(2))
  assert set(a) == set(b)
  for name in a:
    assert_trained_params_close(b[name], a[name], summed_lr)


@pytest.mark.parametrize("lengths", [{"inputs": 16, "targets": 8}, {"inputs": 6, "targets": 3}])
def test_unpacked_features_equal_seqio_converter(setup, lengths):
  """The trainer's one-map conversion gives exactly SeqIO's EncDecFeatureConverter(pack=False)
  output (values and dtypes), with and without truncation (6/3 tokens cut most examples)."""
  task = seqio.get_mixture_or_task("test_trainer_reverse")
  ds = task.get_dataset(sequence_length=lengths, split="train", shuffle=False)
  ours = list(inputs.unpacked_encdec_features(ds, lengths, "test_trainer_reverse").as_numpy_iterator())
  theirs = list(seqio.EncDecFeatureConverter(pack=False)(ds, lengths).as_numpy_iterator())
  assert len(ours) == len(theirs) == 64
  truncated = 0
  for a, b in zip(ours, theirs):
    assert set(a) == set(b) == set(inputs.FEATURES)
    for key in inputs.FEATURES:
      assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    truncated += int(a["decoder_loss_weights"].all())
  assert (truncated == 64) == (lengths["targets"] == 3)


def test_unpacked_features_refuse_untokenized_task():
  from elm_jax import tf_input
  tf = tf_input.tensorflow()
  ds = tf.data.Dataset.from_tensor_slices({"inputs": ["a b"], "targets": ["c"]})
  with pytest.raises(trainer.TrainingError, match=r"'raw_task' yields 'inputs'.*rank-1 integer"):
    inputs.unpacked_encdec_features(ds, {"inputs": 4, "targets": 2}, "raw_task")


@pytest.mark.parametrize("shared_init", [True, False])
def test_initial_experts_share_one_draw_unless_asked(tiny_config, shared_init):
  """The paper starts every expert from the same adapter draw (each is a run with seed 42), which
  is what makes averaging them meaningful; per-expert draws remain available."""
  from elm_jax.models.adapters import ExpertConfig
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  _, stacked = trainer.initial_experts(tiny_config, ExpertConfig(kind="adapter", reduction_factor=4),
                                       pretrained, 3, seed=5, shared_init=shared_init)
  leaves = jax.tree_util.tree_leaves_with_path(stacked)
  kernels = [x for path, x in leaves if "down_kernel" in jax.tree_util.keystr(path)]
  assert kernels and all(np.std(k[0]) > 0 for k in kernels)  # a random draw, not zeros
  for k in kernels:
    assert np.array_equal(k[0], k[1]) == shared_init and np.array_equal(k[1], k[2]) == shared_init
  # Layer-norm scales start from the pretrained backbone either way.
  scales = [x for path, x in leaves if jax.tree_util.keystr(path).endswith("['scale']")]
  assert scales and all(np.array_equal(s[0], s[2]) for s in scales)


def test_truncation_keeps_the_closing_eos():
  """An input or target longer than its length that ends in EOS (1) keeps its EOS last, as the
  paper's tokenizer truncates; one without EOS is cut plainly; a short one is only padded."""
  from elm_jax import tf_input
  tf = tf_input.tensorflow()
  rows = {"inputs": [[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 4], [5, 1]], "targets": [[3, 4, 5, 1], [3, 4, 5, 6], [3, 1]]}
  ds = tf.data.Dataset.from_generator(lambda: ({"inputs": np.asarray(i, np.int32), "targets": np.asarray(t, np.int32)}
                                               for i, t in zip(rows["inputs"], rows["targets"])),
                                      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                                                        "targets": tf.TensorSpec([None], tf.int32)})
  out = list(inputs.unpacked_encdec_features(ds, {"inputs": 4, "targets": 3}, "eos_task").as_numpy_iterator())
  assert [list(o["encoder_input_tokens"]) for o in out] == [[5, 6, 7, 1], [5, 6, 7, 8], [5, 1, 0, 0]]
  assert [list(o["decoder_target_tokens"]) for o in out] == [[3, 4, 1], [3, 4, 5], [3, 1, 0]]
