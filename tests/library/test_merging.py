"""Merging experts: identities every merge must satisfy, hand-computed results, exact LoRA
update merging checked through the model, and the inputs each merge must refuse."""

import dataclasses

import numpy as np
import pytest

from elm_jax import tree_paths
from elm_jax.library.merging import (MergeError, identity_base, merge_by_kind, merge_ties, merge_uniform,
                                     merge_weighted, task_arithmetic)
from elm_jax.models.experts import ExpertConfig

RANK, ALPHA = 2, 16.0
LORA_PARENTS = ("encoder/layers_0/attention/query", "decoder/layers_0/self_attention/value")
LORA = ExpertConfig(kind="lora", lora_rank=RANK, lora_alpha=ALPHA)


def merge_lora_factors(experts, weights=None):
  """LoRA's own `lora_factors` merge (`ExpertKind.merge_methods`): the merged tree."""
  return merge_by_kind(experts, LORA, "lora_factors", weights)[0]


def merge_lora_updates(experts, weights=None):
  """LoRA's own `lora_updates` merge: (merged tree, config changes)."""
  return merge_by_kind(experts, LORA, "lora_updates", weights)


def _flat(tree):
  return {tree_paths.join(p): np.asarray(v) for p, v in tree_paths.flatten(tree).items()}


# Merges are numpy, in float64, rounded to float32 at the end: against float32 or float64
# re-computations they agree to an ulp or two (rtol 1e-6 ~ 8 eps32; worst seen 0.12 of the bound),
# the same on any CPU (elementwise IEEE arithmetic; float64 matmuls add ~1e-16).
def _assert_trees_close(got, want, atol=1e-6):
  got, want = _flat(got), _flat(want)
  assert sorted(got) == sorted(want)
  for path in want:
    assert got[path].dtype == np.float32, path
    np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=atol, err_msg=path)


def _normal(rng, shape, mean=0.0, std=1.0):
  return (mean + std * rng.normal(size=shape)).astype(np.float32)


def _adapter_expert(rng):
  """A small adapter-shaped expert tree with a layer-norm scale."""
  return {"encoder": {"layers_0": {
      "mlp_adapter": {"down_kernel": _normal(rng, (6, 2)), "up_bias": _normal(rng, (6,))},
      "pre_mlp_layer_norm": {"scale": _normal(rng, (6,), 1.0, 0.1)}}}}


def _lora_expert(rng, emb=6):
  """A LoRA expert tree: factors for two targets of rank RANK and one layer-norm scale."""
  flat = {("encoder", "encoder_norm", "scale"): _normal(rng, (emb,), 1.0, 0.1)}
  for parent in LORA_PARENTS:
    flat[tree_paths.split(parent) + ("lora_a",)] = _normal(rng, (emb, RANK))
    flat[tree_paths.split(parent) + ("lora_b",)] = _normal(rng, (RANK, emb))
  return tree_paths.unflatten(flat)


def _shapes(tree):
  return {path: value.shape for path, value in _flat(tree).items()}


def _updates(tree, rank):
  """{parent: (alpha / rank) * lora_a @ lora_b}, as layers.Kernel adds it to the kernel."""
  flat = _flat(tree)
  return {p: (ALPHA / rank) * flat[p + "/lora_a"].astype(np.float64) @ flat[p + "/lora_b"]
          for p in LORA_PARENTS}


def _base(expert):
  """Zeros for adapters, the (made-up) pretrained value 1 for layer-norm scales."""
  flat = tree_paths.flatten(expert)
  return tree_paths.unflatten({p: np.full(np.shape(v), 1.0 if p[-1] == "scale" else 0.0, np.float32)
                               for p, v in flat.items()})


# ------------------------------------------------------------------ identities
def test_merging_one_expert_returns_it():
  rng = np.random.default_rng(0)
  expert, lora = _adapter_expert(rng), _lora_expert(rng)
  _assert_trees_close(merge_uniform([expert]), expert)
  _assert_trees_close(merge_weighted([expert], [3.0]), expert)
  _assert_trees_close(task_arithmetic([expert], _base(expert)), expert)
  _assert_trees_close(merge_ties([expert], _base(expert), density=1.0), expert)
  _assert_trees_close(merge_lora_factors([lora]), lora)
  merged, changes = merge_lora_updates([lora])
  assert changes == {"lora_rank": RANK}
  _assert_trees_close(merged, lora)


def test_merging_copies_of_one_expert_returns_it():
  rng = np.random.default_rng(1)
  expert, lora, k = _adapter_expert(rng), _lora_expert(rng), 3
  _assert_trees_close(merge_uniform([expert] * k), expert)
  _assert_trees_close(merge_weighted([expert] * k, [1.0, 2.0, 5.0]), expert)
  _assert_trees_close(task_arithmetic([expert] * k, _base(expert), scale=1 / k), expert)
  _assert_trees_close(merge_ties([expert] * k, _base(expert), density=1.0), expert)
  _assert_trees_close(merge_lora_factors([lora] * k), lora)
  merged, changes = merge_lora_updates([lora] * k)
  assert changes == {"lora_rank": k * RANK}
  for parent, update in _updates(lora, RANK).items():
    np.testing.assert_allclose(_updates(merged, k * RANK)[parent], update, rtol=1e-6, atol=1e-6)


def test_merges_do_not_depend_on_the_order_of_the_experts():
  rng = np.random.default_rng(2)
  experts, loras = [_adapter_expert(rng) for _ in range(4)], [_lora_expert(rng) for _ in range(4)]
  weights, perm = [0.5, 1.0, 2.0, 0.0], [2, 0, 3, 1]
  permuted, permuted_loras = [experts[i] for i in perm], [loras[i] for i in perm]
  permuted_weights, base = [weights[i] for i in perm], _base(experts[0])
  _assert_trees_close(merge_uniform(permuted), merge_uniform(experts))
  _assert_trees_close(merge_weighted(permuted, permuted_weights), merge_weighted(experts, weights))
  _assert_trees_close(task_arithmetic(permuted, base, 0.3), task_arithmetic(experts, base, 0.3))
  _assert_trees_close(merge_ties(permuted, base, 0.3), merge_ties(experts, base, 0.3))
  _assert_trees_close(merge_lora_factors(permuted_loras, permuted_weights),
                      merge_lora_factors(loras, weights))
  got, _ = merge_lora_updates(permuted_loras, permuted_weights)
  want, _ = merge_lora_updates(loras, weights)
  np.testing.assert_allclose(_flat(got)["encoder/encoder_norm/scale"],
                             _flat(want)["encoder/encoder_norm/scale"], rtol=1e-6)
  for parent, update in _updates(want, 4 * RANK).items():
    np.testing.assert_allclose(_updates(got, 4 * RANK)[parent], update, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ hand-computed results
def test_uniform_is_the_mean_of_every_leaf():
  a = {"adapter": {"w": np.array([[1.0, 2.0], [3.0, 4.0]])}, "norm": {"scale": np.array([1., 5.])}}
  b = {"adapter": {"w": np.array([[3.0, 0.0], [1.0, 8.0]])}, "norm": {"scale": np.array([2., 2.])}}
  merged = merge_uniform([a, b])
  np.testing.assert_array_equal(merged["adapter"]["w"], [[2.0, 1.0], [2.0, 6.0]])
  np.testing.assert_array_equal(merged["norm"]["scale"], [1.5, 3.5])
  assert merged["adapter"]["w"].dtype == np.float32 and isinstance(merged["norm"]["scale"], np.ndarray)


def test_weighted_with_weights_one_zero_returns_the_first():
  rng = np.random.default_rng(3)
  first, second = _adapter_expert(rng), _adapter_expert(rng)
  _assert_trees_close(merge_weighted([first, second], [1.0, 0.0]), first)
  mixed = merge_weighted([first, second], [1.0, 3.0])  # normalised to 0.25, 0.75
  for path, value in _flat(mixed).items():
    np.testing.assert_allclose(value, 0.25 * _flat(first)[path] + 0.75 * _flat(second)[path],
                               rtol=1e-6, atol=1e-7)


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
  base = {"w": np.array([1.0, 1.0])}
  experts = [{"w": np.array([2.0, 0.0])}, {"w": np.array([4.0, 3.0])}]
  np.testing.assert_allclose(task_arithmetic(experts, base, scale=0.5)["w"], [1 + 0.5 * 4, 1 + 0.5 * 1])


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
  experts = [np.array([1.0, -2.0, 0.5, 0.0]), np.array([3.0, 1.0, -0.5, 0.0]),
             np.array([-1.0, 2.0, -1.5, 0.0])]
  base = 10.0
  trees = [{"w": base + e} for e in experts]
  # density 1: sums [3, 1, -1.5, 0] -> signs [+, +, -, 0]; means of the agreeing entries.
  np.testing.assert_allclose(merge_ties(trees, {"w": np.full(4, base)}, density=1.0)["w"],
                             base + np.array([2.0, 1.5, -1.0, 0.0]))
  # density 0.5 keeps 2 of 4 per expert: [1, -2, 0, 0], [3, 1, 0, 0], [0, 2, -1.5, 0];
  # sums [4, 1, -1.5, 0] -> [+, +, -, 0]; means [(1+3)/2, (1+2)/2, -1.5, 0]; scale 0.5.
  np.testing.assert_allclose(
      merge_ties(trees, {"w": np.full(4, base)}, density=0.5, scale=0.5)["w"],
      base + 0.5 * np.array([2.0, 1.5, -1.5, 0.0]))


def test_identity_base_zeroes_added_modules_and_keeps_pretrained_norms(tiny_config):
  import flax.linen as nn
  import jax

  from elm_jax.models.experts import split_params
  from elm_jax.models.t5 import init_params
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=ExpertConfig()))
  backbone, expert = split_params(params, ExpertConfig())
  base = _flat(identity_base(expert, ExpertConfig(), params))
  pretrained = _flat(params)
  assert sorted(base) == sorted(_flat(expert))
  for path, value in base.items():
    want = pretrained[path] if path.endswith("/scale") else np.zeros_like(value)
    np.testing.assert_array_equal(value, want, err_msg=path)
  assert all(not v.any() for v in _flat(identity_base(expert, ExpertConfig())).values())
  with pytest.raises(MergeError, match="decoder/decoder_norm/scale.*full pretrained"):
    identity_base(expert, ExpertConfig(), backbone)


# ------------------------------------------------------------------ LoRA
def test_lora_update_merge_is_the_mean_of_the_updates():
  rng = np.random.default_rng(4)
  loras, weights = [_lora_expert(rng) for _ in range(3)], [1.0, 2.0, 3.0]
  merged, changes = merge_lora_updates(loras, weights)
  assert changes == {"lora_rank": 3 * RANK}
  shapes = _shapes(merged)
  assert shapes[LORA_PARENTS[0] + "/lora_a"] == (6, 3 * RANK)
  assert shapes[LORA_PARENTS[0] + "/lora_b"] == (3 * RANK, 6)
  each = [_updates(lora, RANK) for lora in loras]
  for parent, update in _updates(merged, changes["lora_rank"]).items():
    want = sum(w * e[parent] for w, e in zip(weights, each)) / sum(weights)
    np.testing.assert_allclose(update, want, rtol=1e-6, atol=1e-6)
  norms = [_flat(lora)["encoder/encoder_norm/scale"] for lora in loras]
  np.testing.assert_allclose(_flat(merged)["encoder/encoder_norm/scale"],
                             sum(w * n for w, n in zip(weights, norms)) / 6.0, rtol=1e-6)
  # The factor mean is a different thing: its update is mean(A) @ mean(B).
  factors = _updates(merge_lora_factors(loras), RANK)
  assert not np.allclose(factors[LORA_PARENTS[0]], sum(e[LORA_PARENTS[0]] for e in each) / 3)


def _random_like(template, rng):
  """An expert tree shaped like `template`: layer-norm scales near 1, LoRA factors N(0, 0.3^2)."""
  return tree_paths.unflatten({p: (1.0 if p[-1] == "scale" else 0.0) + 0.3 * rng.normal(size=v.shape)
                               for p, v in tree_paths.flatten(template).items()})


def _dense_mean_update(backbone, loras):
  """The backbone with (alpha / r) * mean_i(A_i @ B_i) added to each LoRA-targeted kernel and
  the mean layer-norm scales: the parameters of a plain model equal to the exact merge."""
  dense, flats = tree_paths.flatten(backbone), [tree_paths.flatten(e) for e in loras]
  for path in flats[0]:
    if path[-1] == "lora_a":
      b, kernel = path[:-1] + ("lora_b",), path[:-1] + ("kernel",)
      mean = sum(np.asarray(f[path], np.float64) @ f[b] for f in flats) / len(flats)
      dense[kernel] = np.asarray(dense[kernel]) + (ALPHA / RANK) * mean
    elif path[-1] != "lora_b":
      dense[path] = sum(f[path] for f in flats) / len(flats)
  return tree_paths.unflatten(dense)


def test_lora_update_merge_through_the_model_equals_the_dense_mean_update(tiny_config):
  import flax.linen as nn
  import jax

  from elm_jax.models.experts import merge_params, split_params
  from elm_jax.models.t5 import Transformer, init_params
  lora_config = LORA
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=lora_config))
  backbone, template = split_params(params, lora_config)
  rng = np.random.default_rng(5)
  loras = [_random_like(template, rng) for _ in range(3)]
  merged, changes = merge_lora_updates(loras)
  merged_config = dataclasses.replace(lora_config, **changes)
  fresh = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(1), expert=merged_config))
  assert _shapes(split_params(fresh, merged_config)[1]) == _shapes(merged)

  enc = np.array([[5, 9, 13, 2, 7, 1, 0, 0]], np.int32)
  dec = np.array([[0, 4, 8, 15, 16, 23, 42, 1]], np.int32)
  got = Transformer(tiny_config, merged_config).apply(
      {"params": merge_params(backbone, merged)}, enc, dec)
  want = Transformer(tiny_config).apply({"params": _dense_mean_update(backbone, loras)}, enc, dec)
  # Our float32 model (kernel + scale A @ B) against a float64 merged kernel: float32 rounding of
  # the logits (up to ~3), worst seen 5.3e-6; atol 1e-4 ~ 3e-5 x max |logit| (as test_hf_parity).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  # The factor mean, by contrast, changes the logits well beyond that tolerance.
  factors = Transformer(tiny_config, lora_config).apply(
      {"params": merge_params(backbone, merge_lora_factors(loras))}, enc, dec)
  assert np.abs(np.asarray(factors) - np.asarray(want)).max() > 1e-2


@pytest.mark.parametrize("method", ["uniform", "lora_factors", "lora_updates"])
def test_merged_lora_holds_the_parameter_list_of_its_config(tiny_config, method):
  """What `merge` checks before it saves: the merged tree is exactly the parameter list of the
  config it is saved with (rank k * r after an update merge), all finite."""
  import flax.linen as nn
  import jax

  from elm_jax.checkpoints import expert_files
  from elm_jax.models.experts import split_params
  from elm_jax.models.t5 import init_params
  lora_config = LORA
  _, template = split_params(nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0), expert=lora_config)),
                             lora_config)
  rng = np.random.default_rng(6)
  loras = [_random_like(template, rng) for _ in range(3)]
  merged, changes = {"uniform": (merge_uniform(loras), {}), "lora_factors": (merge_lora_factors(loras), {}),
                     "lora_updates": merge_lora_updates(loras)}[method]
  config = dataclasses.replace(lora_config, **changes)
  flat = _flat(merged)
  layout = {k: (v.shape, v.dtype) for k, v in flat.items()}
  assert expert_files.layout_problems(layout, config,
                                      expert_files.parameter_list(config, tiny_config, "merged")) == []
  assert expert_files.nonfinite_problems(flat) == []
  if changes:  # saved with the members' rank, the merged factors would be refused
    assert expert_files.layout_problems(layout, lora_config,
                                        expert_files.parameter_list(lora_config, tiny_config, "merged"))


def test_values_beyond_float32_become_inf_without_a_warning():
  """A merge whose values overflow float32 returns Inf (which `merge` refuses to save) quietly."""
  import warnings
  expert = {"w": np.full((2,), 1e38, np.float32)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    merged = task_arithmetic([expert, expert], {"w": np.zeros((2,), np.float32)}, scale=10.0)
  assert np.isinf(merged["w"]).all()


# ------------------------------------------------------------------ refused inputs
def test_refuses_empty_and_single_tree_inputs():
  with pytest.raises(MergeError, match="at least one expert"):
    merge_uniform([])
  with pytest.raises(MergeError, match="single tree"):
    merge_uniform(_adapter_expert(np.random.default_rng(0)))


def test_refuses_mismatched_leaf_sets_naming_the_path_and_expert():
  rng = np.random.default_rng(6)
  experts = [_adapter_expert(rng) for _ in range(3)]
  del experts[2]["encoder"]["layers_0"]["pre_mlp_layer_norm"]
  with pytest.raises(MergeError, match=r"expert 2: parameter "
                                       r"'encoder/layers_0/pre_mlp_layer_norm/scale' is missing"):
    merge_uniform(experts)
  experts[2]["encoder"]["layers_0"]["extra"] = {"scale": np.ones(6)}
  with pytest.raises(MergeError,
                     match=r"expert 2: parameter 'encoder/layers_0/extra/scale' is not in expert 0"):
    merge_ties(experts, _base(experts[0]))


def test_refuses_mismatched_shapes_naming_the_path_and_expert():
  rng = np.random.default_rng(7)
  experts = [_adapter_expert(rng) for _ in range(2)]
  experts[1]["encoder"]["layers_0"]["mlp_adapter"]["down_kernel"] = np.zeros((6, 3))
  with pytest.raises(MergeError, match=r"expert 1: parameter 'encoder/layers_0/mlp_adapter/"
                                       r"down_kernel' has shape \(6, 3\), expected \(6, 2\)"):
    merge_weighted(experts, [1, 1])
  base = _base(experts[0])
  base["encoder"]["layers_0"]["mlp_adapter"]["up_bias"] = np.zeros(5)
  with pytest.raises(MergeError, match=r"base: parameter 'encoder/layers_0/mlp_adapter/up_bias'"):
    task_arithmetic(experts[:1], base)


@pytest.mark.parametrize("weights, message", [([1.0], "expected 2 weights"),
                                              ([1.0, -1.0], "non-negative"),
                                              ([0.0, 0.0], "not all zero")])
def test_refuses_bad_weights(weights, message):
  experts = [_lora_expert(np.random.default_rng(i)) for i in range(2)]
  for merge in (merge_weighted, merge_lora_factors, merge_lora_updates):
    with pytest.raises(MergeError, match=f"weights: .*{message}"):
      merge(experts, weights)


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_ties_refuses_density_outside_zero_one(density):
  expert = _adapter_expert(np.random.default_rng(8))
  with pytest.raises(MergeError, match="density"):
    merge_ties([expert], _base(expert), density=density)


def test_lora_merges_refuse_non_lora_and_unpaired_factors():
  with pytest.raises(MergeError, match="lora_a and lora_b"):
    merge_lora_updates([_adapter_expert(np.random.default_rng(9))])
  with pytest.raises(MergeError, match="--method=lora_updates: the experts are 'adapter' experts, whose own "
                                       "merges are none"):
    merge_by_kind([_adapter_expert(np.random.default_rng(9))], ExpertConfig(), "lora_updates")
  lora = _lora_expert(np.random.default_rng(10))
  del lora["encoder"]["layers_0"]["attention"]["query"]["lora_b"]
  with pytest.raises(MergeError, match="'encoder/layers_0/attention/query/lora_a' has no 'lora_b'"):
    merge_lora_factors([lora])
