"""PHATGOOSE gate training (`training/gates.py`) on tiny SeqIO tasks: the gate sites each kind
defines, the loss falls, one compiled program for the vmapped step, kill and resume equals an
uninterrupted run (bitwise on CPU), and a MODEL_DIR of another gate run is refused."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import tree_paths
from elm_jax.models import routing
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.training import gates, trainer
from elm_jax.training.errors import TrainingError
from tests.helpers import word_tasks

TASKS = ("test_gates_reverse", "test_gates_first")
ADAPTER = ExpertConfig(kind="adapter", reduction_factor=4)


@pytest.fixture(scope="module")
def setup(tiny_config):
  word_tasks.register("test_gates")
  model = EncoderDecoderModel.build(tiny_config, ADAPTER)
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  backbone, stacked = model.init_experts(pretrained, len(TASKS), seed=1, shared_init=False)
  rng = np.random.default_rng(3)  # adapters that change the output (their up-projection starts near 0)
  stacked = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 1.0, x.shape).astype(np.float32), stacked)
  return model, backbone, stacked


def _config(model_dir, steps=6, save_every=2):
  return trainer.TrainConfig(model_dir=str(model_dir), expert_tasks=TASKS, expert_names=("rev", "first"),
                             steps=steps, batch_size=4, input_length=16, target_length=8, save_every=save_every,
                             log_every=1)


def test_gate_sites_are_where_each_kind_acts(tiny_config):
  pretrained = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  # adapters: after self-attention and the feed-forward of each of 2 + 2 blocks; LoRA on query
  # and wo: the encoder's 2 x 2, the decoder's 2 x 3 (self- and cross-attention queries).
  for expert_config, count, expected in (
      (ADAPTER, 8, {("encoder", "layers_0", "attention"), ("encoder", "layers_1", "mlp"),
                    ("decoder", "layers_0", "self_attention"), ("decoder", "layers_1", "mlp")}),
      (ExpertConfig(kind="lora", lora_targets=("query", "wo")), 10,
       {("encoder", "layers_0", "attention", "query"), ("decoder", "layers_1", "mlp", "wo"),
        ("decoder", "layers_0", "encoder_decoder_attention", "query")})):
    model = EncoderDecoderModel.build(tiny_config, expert_config)
    backbone, stacked = model.init_experts(pretrained, 1, seed=0)
    sites = routing.gate_sites(model, backbone, stacked)
    assert expected <= set(sites) and len(sites) == count, sorted(sites)
    widths = {key: tiny_config.mlp_dim if key[-1] == "wo" else tiny_config.emb_dim for key in sites}
    assert sites == widths  # each gate is as wide as its module's input


def test_gates_learn_in_one_program(setup, tmp_path):
  model, backbone, stacked = setup
  config = _config(tmp_path, steps=12, save_every=12)
  compiled = gates.gate_step._cache_size()  # other modules' gate runs compiled their own shapes
  trained, metrics = gates.train_gates(config, model, backbone, stacked,
                                       optimizer_config=gates.gate_optimizer(0.3))
  # One program for all 12 steps of E experts' gates (none new if an earlier test made this shape).
  assert gates.gate_step._cache_size() - compiled <= 1
  log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
  for name in ("rev", "first"):
    first, last = log[0]["experts"][name]["loss"], log[-1]["experts"][name]["loss"]
    assert last < first - 0.05, (name, [r["experts"][name]["loss"] for r in log])
    assert metrics[name]["loss"] == log[-1]["experts"][name]["loss"]
  assert len(trained) == 2 and set(trained[0]) == set(trained[1])
  assert any(np.abs(g).max() > 0 for g in trained[0].values())


def test_zero_gates_add_half_of_each_experts_change(setup):
  """sigmoid(<x, 0>) = 1/2 at every module: the gated experts' losses equal those of the experts
  with their adapters' up-projections (weights and biases) halved, base + up(gelu(down(h))) / 2."""
  model, backbone, stacked = setup
  gate_model = gates.GateModel.of(model)
  frozen = {"backbone": routing.routed_backbone(gate_model.routed, backbone, stacked), "experts": stacked}
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(3, 300, (2, 2, 6)).astype(np.int32)
           for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
  gated = np.asarray(jax.jit(gate_model.expert_losses)(frozen, gates.initial_gates(model, backbone, stacked), batch)[0])
  halved = {p: v * 0.5 if p[-1].startswith("up_") else v for p, v in tree_paths.flatten(stacked).items()}
  expected = np.asarray(jax.jit(model.expert_losses)(backbone, tree_paths.unflatten(halved), batch)[0])
  whole = np.asarray(jax.jit(model.expert_losses)(backbone, stacked, batch)[0])
  np.testing.assert_allclose(gated, expected, rtol=1e-5)
  assert not np.allclose(gated, whole, rtol=1e-3)  # the gate matters


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
  model, backbone, stacked = setup
  whole, _ = gates.train_gates(_config(tmp_path / "a"), model, backbone, stacked)

  def kill_at_5(step):
    if step == 5:
      raise KeyboardInterrupt  # killed between the checkpoints at 4 and 6
  with pytest.raises(KeyboardInterrupt):
    gates.train_gates(_config(tmp_path / "b"), model, backbone, stacked, on_step=kill_at_5)
  resumed, _ = gates.train_gates(_config(tmp_path / "b"), model, backbone, stacked)
  for a, b in zip(whole, resumed):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(b[key], a[key], err_msg=key)  # exact: same program, state restored bitwise
  again, metrics = gates.train_gates(_config(tmp_path / "b"), model, backbone, stacked)  # finished: nothing to do
  assert metrics == {} and all(np.array_equal(again[0][k], whole[0][k]) for k in whole[0])


def test_model_dir_of_another_gate_run_is_refused(setup, tmp_path):
  model, backbone, stacked = setup
  gates.train_gates(_config(tmp_path, steps=1), model, backbone, stacked)
  with pytest.raises(TrainingError, match="gate_run.json.*steps"):
    gates.train_gates(_config(tmp_path, steps=2), model, backbone, stacked)


def test_gates_on_a_mesh_equal_one_device_and_resume_there(setup, tmp_path):
  """Gates, optimizer state and experts split over the `expert` axis (2), batches over `data` (2),
  the backbone over `model` (2): the gates equal one device's (partitioned matmuls sum in another
  order: float32 rounding, not bitwise); a run killed at step 3 and resumed on the mesh equals the
  uninterrupted mesh run bitwise. 3 experts on an expert axis of 2 are refused."""
  from elm_jax import partitioning
  model, backbone, stacked = setup
  alone, _ = gates.train_gates(_config(tmp_path / "one", steps=4), model, backbone, stacked)
  mesh = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=2, model=2))
  split, _ = gates.train_gates(_config(tmp_path / "mesh", steps=4), model, backbone, stacked, partitioner=mesh)

  def kill_at_3(step):
    if step == 3:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    gates.train_gates(_config(tmp_path / "killed", steps=4), model, backbone, stacked, partitioner=mesh,
                      on_step=kill_at_3)
  resumed, _ = gates.train_gates(_config(tmp_path / "killed", steps=4), model, backbone, stacked, partitioner=mesh)
  for a, b, c in zip(alone, split, resumed):
    assert sorted(a) == sorted(b) == sorted(c)
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
      np.testing.assert_array_equal(c[key], b[key], err_msg=key)
  assert any(np.abs(g).max() > 0 for g in split[0].values())
  three = jax.tree_util.tree_map(lambda x: np.concatenate([x, x[:1]]), stacked)
  config = trainer.TrainConfig(model_dir=str(tmp_path / "three"), expert_tasks=TASKS + TASKS[:1], steps=1,
                               expert_names=("a", "b", "c"), batch_size=4, input_length=16, target_length=8)
  with pytest.raises(TrainingError, match="3 experts cannot be split over the mesh's expert axis of 2"):
    gates.train_gates(config, model, backbone, three, partitioner=mesh)
