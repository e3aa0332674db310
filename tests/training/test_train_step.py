"""E experts trained in one vmapped step equal each expert trained alone; the backbone is frozen."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.helpers.trees import assert_trained_params_close
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.training import train_step as ts

STEPS = 4
EXPERTS = 3


def _batch(seed, batch=2, enc=12, dec=6):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 300, (batch, dec)).astype(np.int32)
  targets[:, -2:] = 0  # padding is not trained on
  return {"encoder_input_tokens": rng.integers(2, 300, (batch, enc)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets}


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


@pytest.fixture(scope="module")
def setup(tiny_config):
  expert_cfg = ExpertConfig()
  full = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=expert_cfg))
  backbone, _ = split_params(full, expert_cfg)
  experts = [split_params(nn.unbox(init_params(tiny_config, jax.random.PRNGKey(10 + e),
                                               expert=expert_cfg)), expert_cfg)[1]
             for e in range(EXPERTS)]
  batches = [[_batch(100 * e + s) for s in range(STEPS)] for e in range(EXPERTS)]
  model = EncoderDecoderModel.build(tiny_config, expert_cfg)
  return model, backbone, experts, batches


@functools.lru_cache(maxsize=None)
def _compiled(model, optimizer_config):
  """One optimizer and one jitted step per config (recompiled only for a new expert count)."""
  optimizer = ts.make_optimizer(optimizer_config, total_steps=STEPS)
  return optimizer, jax.jit(functools.partial(ts.train_step, model=model, optimizer=optimizer))


def _train(model, backbone, expert_list, batch_lists, optimizer_config):
  optimizer, step = _compiled(model, optimizer_config)
  state = ts.init_train_state(_stack(expert_list), optimizer)
  history = []
  for s in range(STEPS):
    state, metrics = step(state, backbone, _stack([b[s] for b in batch_lists]))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_vmapped_experts_equal_experts_trained_alone(setup, name):
  model, backbone, experts, batches = setup
  config = ts.OptimizerConfig(name=name, learning_rate=1e-2, max_grad_norm=0.5)
  backbone_before = jax.tree_util.tree_map(np.array, backbone)
  together, history = _train(model, backbone, experts, batches, config)
  for e in range(EXPERTS):
    alone, alone_history = _train(model, backbone, [experts[e]], [batches[e]], config)
    # Two code paths of ours, not exact (batch of 3 experts against 1: other shapes, other
    # summation order); see assert_trained_params_close. Worst entry here 3.6e-7; with the
    # backbone perturbed by 1 ulp (150 draws, emulating another CPU's rounding) adamw reaches
    # 1.2e-4 at one entry (a gradient near 0), all others below 5e-3 x summed_lr = 1.25e-4.
    assert_trained_params_close(jax.tree_util.tree_map(lambda a: np.asarray(a)[e], together.params),
                                jax.tree_util.tree_map(lambda a: np.asarray(a)[0], alone.params),
                                summed_lr=sum(float(ts.learning_rate_schedule(config, STEPS)(i))
                                              for i in range(STEPS)))
    # Losses and gradient norms: worst seen 2.1e-7 and 3.9e-7 relative, 2.6e-7 and 1.3e-6 in the
    # 1-ulp draws (a norm of gradients that Adam's noise has moved, hence the wider bound).
    for m, m_alone in zip(history, alone_history):
      np.testing.assert_allclose(m["loss"][e], m_alone["loss"][0], rtol=1e-5)
      np.testing.assert_allclose(m["grad_norm"][e], m_alone["grad_norm"][0], rtol=1e-4)
  # Training moved the experts, and never the backbone.
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a)[0] - b).max()),
                                 together.params, experts[0])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4
  jax.tree_util.tree_map(np.testing.assert_array_equal, backbone, backbone_before)  # exact: frozen
  assert history[-1]["loss"].shape == (EXPERTS,) and (history[-1]["tokens"] == 8).all()


def test_loss_goes_down_on_a_repeated_batch(setup):
  model, backbone, experts, batches = setup
  repeated = [[batches[e][0]] * STEPS for e in range(EXPERTS)]
  _, history = _train(model, backbone, experts, repeated, ts.OptimizerConfig(learning_rate=3e-2))
  assert (history[-1]["loss"] < history[0]["loss"]).all()


def test_schedule_and_bad_optimizer():
  schedule = ts.learning_rate_schedule(ts.OptimizerConfig(learning_rate=1e-4), total_steps=10)
  assert float(schedule(0)) == pytest.approx(1e-4) and float(schedule(10)) == pytest.approx(0.0)
  with pytest.raises(ts.OptimizerConfigError, match="OptimizerConfig.name"):
    ts.make_optimizer(ts.OptimizerConfig(name="sgd"), 10)


def test_adafactor_scales_updates_by_parameter_rms_when_asked():
  """T0's Adafactor (Mesh TensorFlow's default, set by experiments/t0_multitask_xl.gin) scales
  each update by the parameter's RMS, floored at 1e-3; without the flag the update is not."""
  params = {"w": np.full((256, 256), 0.5, np.float32), "z": np.zeros((256, 256), np.float32)}
  grads = {"w": np.ones((256, 256), np.float32), "z": np.ones((256, 256), np.float32)}
  config = ts.OptimizerConfig(name="adafactor", learning_rate=1e-3, schedule="constant", max_grad_norm=None)
  scaled = ts.make_optimizer(ts.OptimizerConfig(**{**config.__dict__, "multiply_by_parameter_scale": True}), 10)
  plain = ts.make_optimizer(config, 10)
  up_scaled, _ = scaled.update(grads, scaled.init(params), params)
  up_plain, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(np.asarray(up_plain["w"]), -1e-3, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up_scaled["w"]), -1e-3 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up_scaled["z"]), -1e-3 * 1e-3, rtol=1e-5)
