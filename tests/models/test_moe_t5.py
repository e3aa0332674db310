"""The Mixture-of-Experts T5: parameter layout, sparse upcycling, router losses in the train step,
and expert parallelism (8 fake devices, t5x's MoE layout) equal to the unsharded step."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers.trees import assert_trained_params_close
from elm_jax import partitioning, tree_paths
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.layers import MlpBlock
from elm_jax.models.moe import MoeConfig, MoeLayer
from elm_jax.models.t5 import Transformer, init_params, logical_axes, param_shapes
from elm_jax.models.t5_config import ConfigError, T5Config
from elm_jax.models.upcycling import upcycle_params
from elm_jax.training import train_step as ts
from elm_jax.training.trainer import initial_experts

FULL = ExpertConfig(kind="full")


@pytest.fixture(scope="module")
def dense():
  config = T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                    num_encoder_layers=2, num_decoder_layers=2)
  return config, nn.unbox(init_params(config, jax.random.PRNGKey(0)))


def _batch(rng, batch=8, enc=10, dec=6):
  targets = rng.integers(2, 120, (batch, dec)).astype(np.int32)
  targets[: batch // 2, dec - 2:] = 0  # padded targets are not routed
  return {"encoder_input_tokens": rng.integers(2, 120, (batch, enc)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], -1),
          "decoder_target_tokens": targets}


def test_param_shapes_and_axes(dense):
  config = dense[0].replace(moe=MoeConfig(num_experts=4, layer_interval=2))
  params = nn.unbox(init_params(config, jax.random.PRNGKey(1)))
  shapes = {p: tuple(np.shape(v)) for p, v in tree_paths.flatten(params).items()}
  assert shapes == tree_paths.flatten(param_shapes(config))  # what loaders check is what init makes
  assert shapes[("encoder", "layers_1", "mlp", "expert", "wi_0", "kernel")] == (4, 32, 64)
  assert shapes[("encoder", "layers_1", "mlp", "expert", "wo", "kernel")] == (4, 64, 32)
  assert shapes[("token_embedder", "embedding")] == (128, 32)
  assert shapes[("decoder", "relpos_bias", "rel_embedding")] == (4, 32)
  # Sparse layers 1 and 3 of each stack: their dense MLP is gone, replaced by router + experts.
  assert not any(p[:3] == ("encoder", "layers_3", "mlp") and "wi_0" == p[3] for p in shapes)
  assert shapes[("decoder", "layers_1", "mlp", "router", "kernel")] == (32, 4)
  assert ("encoder", "layers_0", "mlp", "wi_0", "kernel") in shapes  # layer 0 stays dense
  axes = tree_paths.flatten(logical_axes(config), )
  assert tuple(axes[("decoder", "layers_1", "mlp", "expert", "wo", "kernel")]) == ("moe_expert", "mlp", "embed")
  with pytest.raises(ConfigError, match="moe"):
    config.to_hf_config()


@pytest.mark.parametrize("moe", [
    MoeConfig(num_experts=4, num_selected_experts=2, normalize_gates=True, eval_capacity_factor=4.0),
    MoeConfig(num_experts=4, num_selected_experts=1, normalize_gates=True, eval_capacity_factor=4.0),
    MoeConfig(num_experts=4, router="expert_choice", normalize_gates=True, eval_capacity_factor=4.0),
], ids=["top2", "top1", "expert_choice"])
def test_upcycled_model_equals_dense_at_initialisation(dense, moe):
  config, params = dense
  moe_config = config.replace(moe=moe)
  upcycled = upcycle_params(params, moe_config, jax.random.PRNGKey(3))
  batch = _batch(np.random.default_rng(0))
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  want = Transformer(config).apply({"params": params}, *args)
  got = Transformer(moe_config).apply({"params": upcycled}, *args)
  # Positions fed padding are not routed (their logits are never scored); all others agree.
  routed = (batch["decoder_input_tokens"] != 0) | (np.arange(6) == 0)
  assert not routed.all()
  # Two code paths of ours, not exact: normalised gates sum to 1 only up to rounding, and the
  # MoE layer sums p1 y + p2 y in another order than the dense one. Worst seen 2.9e-6 at logits
  # up to 3.65; atol 2e-5 (~5e-6 x max |logit|; ~10x with rtol) covers logits near 0.
  np.testing.assert_allclose(np.asarray(got)[routed], np.asarray(want)[routed], atol=2e-5, rtol=1e-5)
  # Router initialised afresh; every other dense parameter kept.
  flat = tree_paths.flatten(upcycled)
  assert np.std(flat[("encoder", "layers_1", "mlp", "router", "kernel")]) > 0
  np.testing.assert_array_equal(flat[("encoder", "layers_1", "mlp", "expert", "wo", "kernel")][3],
                                params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"])


def test_switch_without_normalisation_scales_by_the_gate(dense):
  """Switch's top-1 keeps the router probability as the combine weight, so an upcycled Switch
  layer gives p * dense(x). With the router's kernel zeroed every token's probabilities are
  1/4 for each of the 4 (identical) experts, so the sparse layer must return dense(x) / 4."""
  config, params = dense
  moe_config = config.replace(moe=MoeConfig(num_experts=4, eval_capacity_factor=4.0))
  upcycled = upcycle_params(params, moe_config, jax.random.PRNGKey(3))
  sparse = dict(upcycled["encoder"]["layers_1"]["mlp"])
  sparse["router"] = {"kernel": np.zeros_like(sparse["router"]["kernel"])}
  x = np.random.default_rng(0).normal(size=(2, 10, config.emb_dim)).astype(np.float32)
  got = MoeLayer(moe_config.moe, config.mlp_dim, config.mlp_activations).apply({"params": sparse}, x)
  want = MlpBlock(config.mlp_dim, config.mlp_activations).apply(
      {"params": params["encoder"]["layers_1"]["mlp"]}, x)
  # Two code paths of ours (dispatch einsums vs one matmul): float32 rounding, not bitwise.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want) / 4, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(want)).max() > 0.1  # a zero output would not test the scale


def test_upcycle_refuses_mismatched_checkpoints(dense):
  config, params = dense
  with pytest.raises(ConfigError, match="no `moe`"):
    upcycle_params(params, config, jax.random.PRNGKey(0))
  wider = config.replace(mlp_dim=128, moe=MoeConfig(num_experts=2))
  with pytest.raises(ConfigError, match=r"encoder/layers_0/mlp/wi_0/kernel has shape \(32, 64\)"):
    upcycle_params(params, wider, jax.random.PRNGKey(0))
  narrow = config.replace(moe=MoeConfig(num_experts=2, expert_mlp_dim=16))
  with pytest.raises(ConfigError, match="expert_mlp_dim"):
    upcycle_params(params, narrow, jax.random.PRNGKey(0))


def test_train_step_adds_weighted_router_losses(dense):
  config, params = dense
  moe = MoeConfig(num_experts=4, train_capacity_factor=0.5, min_expert_capacity=1,
                  load_balancing_weight=0.1, router_z_loss_weight=0.01)
  moe_config = config.replace(moe=moe)
  upcycled = upcycle_params(params, moe_config, jax.random.PRNGKey(3))
  backbone, experts = initial_experts(moe_config, FULL, upcycled, 1, seed=0)
  batch = {k: v[None] for k, v in _batch(np.random.default_rng(1)).items()}
  optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-3), total_steps=2)
  step = jax.jit(functools.partial(ts.train_step, model=EncoderDecoderModel.build(moe_config, FULL),
                                   optimizer=optimizer))
  _, metrics = step(ts.init_train_state(experts, optimizer), backbone, batch)
  metrics = {k: np.asarray(v)[0] for k, v in metrics.items()}
  want = metrics["cross_entropy"] + 0.1 * metrics["load_balancing_loss"] + 0.01 * metrics["router_z_loss"]
  # The same float32 sum, ours against numpy: equal here, but not bitwise by construction (XLA
  # may fuse into FMAs); a few ulps (eps32 1.2e-7) at most.
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  # Switch's loss is E * sum_e f_e P_e, 1 for a balanced router; two sparse layers. It is not a
  # bound for argmax routing in general, but this router is near-uniform at initialisation.
  assert 1.5 < metrics["load_balancing_loss"] < 4.0
  for layer in ("encoder/layers_1", "decoder/layers_1"):
    assert 0.0 < metrics[f"fraction_dropped/{layer}"] < 1.0  # capacity factor 0.5 must drop
    # The max load is >= the mean 1/4 and equals it here (encoder): an ulp of slack for rounding.
    assert 0.25 - 1e-6 <= metrics[f"expert_load_max/{layer}"] <= 1.0 + 1e-6
  assert "fraction_dropped/encoder/layers_0" not in metrics


@pytest.mark.slow
def test_expert_parallel_step_equals_unsharded(dense):
  """t5x's MoE layout: batch over data x expert, MoE experts over `expert`; 3 steps equal."""
  config, params = dense
  moe_config = config.replace(moe=MoeConfig(num_experts=4, num_selected_experts=2, max_group_size=10))
  upcycled = upcycle_params(params, moe_config, jax.random.PRNGKey(3))
  backbone, experts = initial_experts(moe_config, FULL, upcycled, 1, seed=0)
  rng = np.random.default_rng(2)
  batches = [{k: v[None] for k, v in _batch(rng).items()} for _ in range(3)]
  model = EncoderDecoderModel.build(moe_config, FULL)
  optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-2), total_steps=3)
  step = functools.partial(ts.train_step, model=model, optimizer=optimizer)

  state = ts.init_train_state(experts, optimizer)
  plain = jax.jit(step)
  for batch in batches:
    state, plain_metrics = plain(state, backbone, batch)

  part = partitioning.Partitioner(partitioning.MeshConfig(data=2, expert=4, model=1),
                                  partitioning.MOE_RULES)
  _, specs = model.expert_specs()
  sharded_state = ts.init_train_state(experts, optimizer)
  state_specs = ts.state_specs(specs, sharded_state.opt_state)
  sharded_state = part.place(sharded_state, state_specs)
  batch_specs = {k: P("expert", "batch", "length") for k in batches[0]}
  sharded = part.partition(step, (state_specs, {}, batch_specs), (state_specs, P("expert")))
  for batch in batches:
    sharded_state, metrics = sharded(sharded_state, {}, batch)
  kernel = sharded_state.params["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert kernel.shape == (1, 4, 32, 64)
  assert kernel.addressable_shards[0].data.shape == (1, 1, 32, 64)  # one MoE expert per device
  # Two code paths of ours, not exact: the sharded step sums gradients (all-reduces) in another
  # order, ~1e-7 relative noise that compounds over the steps. Losses: worst 9e-7 relative here,
  # 1.2e-6 with the experts perturbed by 1 ulp (80 draws, emulating another CPU's rounding).
  np.testing.assert_allclose(np.asarray(metrics["loss"]), np.asarray(plain_metrics["loss"]), rtol=1e-5)
  # Parameters: see assert_trained_params_close; worst entry here 4.9e-4, with 1-ulp draws up to
  # 3.7e-3 (at most 6 of 95k entries > 5e-3 x summed_lr); summed_lr 2e-2 (1e-2 decaying over 3).
  summed_lr = sum(float(ts.learning_rate_schedule(ts.OptimizerConfig(learning_rate=1e-2), 3)(i))
                  for i in range(3))
  assert_trained_params_close(sharded_state.params, state.params, summed_lr)
