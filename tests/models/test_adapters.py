"""Expert parameterisations: the paper's adapter placement and size, LoRA, and the split into a
frozen backbone and the expert."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax.models.adapters import (ExpertConfig, ExpertConfigError, count_parameters,
                                     merge_params, split_params)
from elm_jax.models.t5 import Transformer, init_params
from elm_jax.models.t5_config import T5Config

XL = T5Config(vocab_size=32128, emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
              num_encoder_layers=24, num_decoder_layers=24)


def _paths(tree, prefix=""):
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      yield from _paths(v, p)
    else:
      yield p


def _without_expert_modules(tree):
  """The backbone's own parameters: drop adapter sub-modules and LoRA factors."""
  out = {}
  for k, v in tree.items():
    if k.endswith("_adapter") or k.startswith("lora_"):
      continue
    out[k] = _without_expert_modules(v) if isinstance(v, dict) else v
  return out


def test_xl_adapter_expert_has_the_papers_parameter_count():
  """ELM_NOTES §1.2-1.3: 96 adapters x 264,256 = 25.37M, plus 122 layer-norm scales x 2048."""
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(XL, jax.random.PRNGKey(0), expert=ExpertConfig())))
  _, expert = split_params(shapes, ExpertConfig())
  adapters = [p for p in _paths(expert) if "_adapter/" in p]
  norms = [p for p in _paths(expert) if p.endswith("/scale")]
  assert len(adapters) == 96 * 4 and len(norms) == 122
  flat = dict(zip(_paths(expert), jax.tree_util.tree_leaves(expert)))
  assert sum(int(np.prod(flat[p].shape)) for p in adapters) == 96 * 264_256
  assert count_parameters(expert) == 96 * 264_256 + 122 * 2048


@pytest.fixture(scope="module")
def tiny_adapted(tiny_config):
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=ExpertConfig()))
  return params


def test_placement_self_attention_and_mlp_never_cross_attention(tiny_adapted):
  adapters = sorted({p.rsplit("/", 1)[0] for p in _paths(tiny_adapted) if "_adapter/" in p})
  assert adapters == sorted(
      [f"encoder/layers_{i}/{a}" for i in range(2) for a in ("attention_adapter", "mlp_adapter")] +
      [f"decoder/layers_{i}/{a}" for i in range(2) for a in ("self_attention_adapter", "mlp_adapter")])
  layer = tiny_adapted["encoder"]["layers_0"]["mlp_adapter"]
  assert layer["down_kernel"].shape == (32, 1) and layer["up_kernel"].shape == (1, 32)  # 32 // 32


def test_initialisation(tiny_config):
  big = tiny_config.replace(emb_dim=256, num_heads=4, head_dim=64)
  params = nn.unbox(init_params(big, jax.random.PRNGKey(0), expert=ExpertConfig()))
  adapter = params["decoder"]["layers_1"]["mlp_adapter"]
  assert abs(float(np.std(adapter["down_kernel"])) - 0.01) < 0.002
  assert abs(float(np.std(adapter["up_kernel"])) - 0.01) < 0.002
  assert not np.any(adapter["down_bias"]) and not np.any(adapter["up_bias"])


def test_identity_adapter_leaves_the_backbone_unchanged(tiny_config, tiny_adapted):
  backbone, expert = split_params(tiny_adapted, ExpertConfig())
  zero_up = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if "up_" in jax.tree_util.keystr(path) else x, expert)
  enc = np.array([[5, 6, 7, 1, 0]], np.int32)
  dec = np.array([[0, 9, 10]], np.int32)
  adapted = Transformer(tiny_config, ExpertConfig()).apply(
      {"params": merge_params(backbone, zero_up)}, enc, dec)
  plain = Transformer(tiny_config).apply({"params": _without_expert_modules(tiny_adapted)}, enc, dec)
  # Exact: a zero up-projection and bias add exact zeros to the residual stream.
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))
  changed = Transformer(tiny_config, ExpertConfig()).apply({"params": tiny_adapted}, enc, dec)
  assert np.abs(np.asarray(changed) - np.asarray(plain)).max() > 0


def test_lora_targets_and_zero_init(tiny_config):
  lora = ExpertConfig(kind="lora", lora_rank=4, lora_targets=("query", "wo"))
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=lora))
  factors = sorted(p for p in _paths(params) if "lora_" in p)
  assert all(p.split("/")[-2] in ("query", "wo") for p in factors)
  assert len(factors) == 2 * (2 * 1 + 2 * 2 + 4)  # a and b: enc query x2, dec self+cross query x2 each, wo x4
  backbone, expert = split_params(params, lora)
  assert {p.rsplit("/", 1)[1] for p in _paths(expert)} == {"lora_a", "lora_b", "scale"}
  enc, dec = np.array([[5, 6, 1]], np.int32), np.array([[0, 7]], np.int32)
  out = Transformer(tiny_config, lora).apply({"params": params}, enc, dec)
  plain = Transformer(tiny_config).apply({"params": _without_expert_modules(params)}, enc, dec)
  # B = 0 at init: kernel + a @ 0 is the kernel bitwise (equal here), but XLA could regroup the
  # LoRA product into the matmul, so a few ulps of slack (|logits| up to ~3).
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_split_merge_round_trip_and_full_fine_tuning(tiny_adapted):
  backbone, expert = split_params(tiny_adapted, ExpertConfig())
  assert not any("_adapter/" in p or p.endswith("/scale") for p in _paths(backbone))
  merged = merge_params(backbone, expert)
  assert sorted(_paths(merged)) == sorted(_paths(tiny_adapted))
  full_backbone, full_expert = split_params(tiny_adapted, ExpertConfig(kind="full"))
  assert full_backbone == {} and count_parameters(full_expert) == count_parameters(tiny_adapted)


def test_bad_expert_configs():
  with pytest.raises(ExpertConfigError, match="ExpertConfig.kind"):
    ExpertConfig(kind="prefix")
  with pytest.raises(ExpertConfigError, match="lora_targets: unknown projection"):
    ExpertConfig(kind="lora", lora_targets=("q",))
