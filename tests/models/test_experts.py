"""Kinds of experts (`elm_jax.models.experts`): found by the package itself, each validating its
own fields; a kind plugs into the T5 by its hooks alone; experts of several kinds share one
stack and score in one pass as each scores alone."""

import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax import expert_stack, tree_paths
from elm_jax.models import experts
from elm_jax.models.experts import (KINDS, ExpertConfig, ExpertConfigError, ExpertKind, ExpertSet,
                                    merge_params)
from elm_jax.models.layers import param_with_axes
from elm_jax.models.model import EncoderDecoderModel

ENC = np.array([[5, 9, 13, 2, 7, 1, 0, 0], [4, 4, 8, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[[3, 6, 1], [7, 1, 0]], [[9, 1, 0], [2, 5, 1]]], np.int32)  # [N=2, C=2, Lt=3]


def test_every_module_defining_a_kind_is_registered_under_its_name():
  modules = [importlib.import_module(f"elm_jax.models.experts.{m.name}")
             for m in pkgutil.iter_modules(experts.__path__)]
  defined = {m.KIND.name: m for m in modules if hasattr(m, "KIND")}
  assert {"adapter", "lora", "full"} <= set(defined)
  assert KINDS == {name: module.KIND for name, module in sorted(defined.items())}
  assert all(module.__name__ == f"elm_jax.models.experts.{name}" for name, module in defined.items())


def test_each_kind_validates_its_own_fields():
  with pytest.raises(ExpertConfigError, match=r"ExpertConfig.kind: expected one of \(.*'adapter'.*'lora'"):
    ExpertConfig(kind="prefix")
  with pytest.raises(ExpertConfigError, match="ExpertConfig.reduction_factor: expected a positive integer, got 0"):
    ExpertConfig(kind="adapter", reduction_factor=0)
  with pytest.raises(ExpertConfigError, match="ExpertConfig.lora_rank: expected a positive integer, got 0"):
    ExpertConfig(kind="lora", lora_rank=0)
  # A field a kind does not read is not its to refuse, nor does it make another expert.
  assert ExpertConfig(kind="lora", reduction_factor=0).lora_rank == 8
  assert ExpertSet.of([ExpertConfig(lora_rank=2), ExpertConfig(lora_rank=3)]).single == ExpertConfig(lora_rank=2)
  with pytest.raises(ExpertConfigError, match="experts of kind 'adapter' with two configurations"):
    ExpertSet.of([ExpertConfig(reduction_factor=4), ExpertConfig(reduction_factor=8)])


class _GainKind(ExpertKind):
  """A kind written here, not in the package: a gate [embed] on the cross-attention `out` kernel's
  columns and a scalar gain on the cross-attention sub-layer's output, both 1 at identity."""
  name = "test_gain"

  def adds(self, path):
    return path.endswith(("/out/gate", "/cross_gain"))

  def identity(self, path):
    return 1.0

  def kernel(self, config, module, kernel):
    if module.path[-2:] != ("encoder_decoder_attention", "out"):
      return kernel
    gate = param_with_axes(module, "gate", nn.initializers.ones, (module.shape[1],), (module.axes[1],))
    return kernel * gate[None, :]

  def sublayer_output(self, config, module, site, h):
    if site != "encoder_decoder_attention":
      return h
    return h * module.param("cross_gain", nn.initializers.ones, (), jnp.float32)


def test_a_kind_plugs_in_by_its_hooks_alone(tiny_config, monkeypatch):
  monkeypatch.setitem(KINDS, "test_gain", _GainKind())
  config = ExpertConfig(kind="test_gain", train_layer_norms=False)
  model = EncoderDecoderModel.build(tiny_config, config)
  shapes = model.expert_shapes()
  assert sorted(shapes) == sorted([f"decoder/layers_{i}/encoder_decoder_attention/out/gate" for i in range(2)] +
                                  [f"decoder/layers_{i}/cross_gain" for i in range(2)])
  assert shapes["decoder/layers_0/encoder_decoder_attention/out/gate"].shape == (tiny_config.emb_dim,)
  _, specs = model.expert_specs()
  assert tuple(specs["decoder"]["layers_0"]["encoder_decoder_attention"]["out"]["gate"]) == ("expert", "embed")

  plain = EncoderDecoderModel.build(tiny_config)
  params = plain.init_params(jax.random.PRNGKey(0))
  backbone, _ = model.split_params(params)
  assert backbone == params  # the kind trains nothing of the backbone
  at_identity = {p: np.ones(s.shape, np.float32) for p, s in shapes.items()}
  want = plain.choice_log_likelihoods(params, ENC, TARGETS)
  got = model.choice_log_likelihoods(merge_params(backbone, tree_paths.unflatten(
      {tree_paths.split(p): v for p, v in at_identity.items()})), ENC, TARGETS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A zero gain silences cross-attention: as a backbone whose cross-attention output is zero.
  silenced = dict(at_identity, **{f"decoder/layers_{i}/cross_gain": np.zeros((), np.float32) for i in range(2)})
  got = model.choice_log_likelihoods(merge_params(backbone, tree_paths.unflatten(
      {tree_paths.split(p): v for p, v in silenced.items()})), ENC, TARGETS)
  flat = tree_paths.flatten(params)
  for i in range(2):
    key = ("decoder", f"layers_{i}", "encoder_decoder_attention", "out", "kernel")
    flat[key] = np.zeros_like(flat[key])
  want = plain.choice_log_likelihoods(tree_paths.unflatten(flat), ENC, TARGETS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def two_kinds(tiny_config):
  """A pretrained tree and two experts: an adapter (layer norms trained) and a LoRA without
  layer norms, each with every leaf moved off its initial value."""
  pretrained = EncoderDecoderModel.build(tiny_config).init_params(jax.random.PRNGKey(0))
  configs = [ExpertConfig(kind="adapter", reduction_factor=4),
             ExpertConfig(kind="lora", lora_rank=2, lora_targets=("query", "value", "wo"), train_layer_norms=False)]
  trees = []
  for seed, config in enumerate(configs):
    _, stacked = EncoderDecoderModel.build(tiny_config, config).init_experts(pretrained, 1, seed=seed)
    rng = np.random.default_rng(seed)
    trees.append(jax.tree_util.tree_map(lambda x, r=rng: x[0] + 0.2 * r.standard_normal(x.shape[1:]).astype(np.float32),
                                        stacked))
  return pretrained, configs, trees


def test_experts_of_two_kinds_share_a_stack_holding_identities_and_pretrained_values(two_kinds):
  pretrained, configs, trees = two_kinds
  stacked, both = expert_stack.stack_mixed(trees, configs, ["a", "l"], pretrained)
  assert both == ExpertSet.of(configs) and both.label == "adapter+lora"
  flat, given = tree_paths.flatten(stacked), tree_paths.flatten(pretrained)
  lora_a = ("encoder", "layers_0", "attention", "query", "lora_a")
  adapter_up = ("decoder", "layers_1", "mlp_adapter", "up_kernel")
  norm = ("encoder", "layers_0", "pre_mlp_layer_norm", "scale")
  assert not flat[lora_a][0].any() and not flat[adapter_up][1].any()  # the other kind's identity: 0
  np.testing.assert_array_equal(flat[norm][1], given[norm])  # LoRA trains no norm: the pretrained one
  np.testing.assert_array_equal(flat[norm][0], tree_paths.flatten(trees[0])[norm])
  with pytest.raises(expert_stack.ExpertStackError, match=r"experts 'l' and 'a' have different configurations, "
                                                          r"and only the second trains 'decoder/decoder_norm/scale'"):
    expert_stack.stack_mixed(trees, configs, ["a", "l"])


def test_experts_of_two_kinds_score_in_one_pass_as_each_alone(tiny_config, two_kinds):
  pretrained, configs, trees = two_kinds
  stacked, both = expert_stack.stack_mixed(trees, configs, ["a", "l"], pretrained)
  model = EncoderDecoderModel.build(tiny_config, both)
  backbone, _ = model.split_params(pretrained)
  together = np.asarray(jax.jit(model.expert_choice_log_likelihoods)(backbone, stacked, ENC, TARGETS))
  for e, (config, tree) in enumerate(zip(configs, trees)):
    alone = EncoderDecoderModel.build(tiny_config, config)
    params = merge_params(alone.split_params(pretrained)[0], tree)
    want = np.asarray(jax.jit(alone.choice_log_likelihoods)(params, ENC, TARGETS))
    # The other kind's module at its identity adds exact zeros (a @ 0, up-projection 0); XLA
    # may still fuse the two programs differently: float32 rounding of scores up to ~20 (worst
    # seen 9.5e-7).
    np.testing.assert_allclose(together[e], want, rtol=1e-6, atol=1e-5)
  assert np.abs(together[0] - together[1]).max() > 1e-3  # two different experts
