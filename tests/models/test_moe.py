"""Sparse Mixture-of-Experts: routing invariants, hand-checked priorities and losses, the layer's
parameter contract, equality with the dense MLP, and sharded == unsharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from elm_jax.models import layers
from elm_jax.models.moe import (MoeConfig, MoeConfigError, MoeLayer, expert_choice_routing,
                                expert_kernel_init, load_balancing_loss, router_losses_and_metrics,
                                router_z_loss, token_groups, top_k_routing)

EMBED, MLP, EXPERTS = 8, 16, 4

# Tolerances. Against numpy re-computations (float32 or float64) of softmaxes over 4 experts and
# sums of a few terms: relative, rtol 1e-6 (~8 eps32; worst seen 1.2e-7, one ulp) where float32
# rounds a few times, 1e-5 for the losses (means of exp/log over ~20 tokens; worst seen 2e-7).
# Masks, slots and counts are integers: exact.

# Jitted once per shape and setting: far fewer compilations than running op by op.
top_k = jax.jit(top_k_routing, static_argnums=(1, 2, 3, 4))
expert_choice = jax.jit(expert_choice_routing, static_argnums=(1, 2))


def _np(result):
  return np.asarray(result.dispatch_mask), np.asarray(result.combine_weights)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def random_logits():
  return np.random.default_rng(0).normal(size=(2, 12, EXPERTS)).astype(np.float32) * 2


# ----------------------------------------------------------------------------- top-k routing
@pytest.mark.parametrize("k,capacity,prioritized", [(1, 2, False), (1, 3, True), (2, 4, False),
                                                    (2, 3, True), (3, 5, False)])
def test_top_k_never_exceeds_capacity(random_logits, k, capacity, prioritized):
  mask = np.random.default_rng(k).random(random_logits.shape[:2]) > 0.2
  dispatch, combine = _np(top_k(jnp.asarray(random_logits), k, capacity, prioritized,
                                        token_mask=jnp.asarray(mask)))
  assert dispatch.shape == (2, 12, EXPERTS, capacity)
  assert set(np.unique(dispatch)) <= {0.0, 1.0}
  assert dispatch.sum(axis=1).max() <= 1  # one token per slot (g, e, c)
  assert (dispatch.sum(axis=(1, 3)) <= capacity).all()  # per expert and group
  assert dispatch.sum(axis=3).max() <= 1  # a token at most once per expert
  assert (dispatch.sum(axis=(2, 3)) <= k).all()
  assert dispatch[~mask].sum() == 0
  best = np.argsort(-random_logits, axis=-1)[..., :k]
  chosen = np.zeros(random_logits.shape, bool)
  np.put_along_axis(chosen, best, True, axis=-1)
  assert dispatch.sum(axis=3)[~chosen].sum() == 0  # only ever one of its k best experts
  assert (combine >= 0).all() and (combine[dispatch == 0] == 0).all()
  assert combine.sum(axis=(2, 3)).max() <= 1 + 1e-6


def test_normalized_gates_sum_to_one_for_every_routed_token(random_logits):
  for result in (top_k(jnp.asarray(random_logits), 2, 3, normalize_gates=True),
                 expert_choice(jnp.asarray(random_logits), 4, normalize_gates=True)):
    dispatch, combine = _np(result)
    routed = dispatch.sum(axis=(2, 3)) > 0
    assert routed.any() and not routed.all()
    np.testing.assert_allclose(combine.sum(axis=(2, 3))[routed], 1.0, rtol=1e-6)
    assert (combine.sum(axis=(2, 3))[~routed] == 0).all()


def test_top_1_with_room_for_everyone_drops_nothing(random_logits):
  dispatch, _ = _np(top_k(jnp.asarray(random_logits), 1, capacity=12))
  assert (dispatch.sum(axis=(2, 3)) == 1).all()


# Token 0..3 of one group, two experts: tokens 0-2 prefer expert 0 (token 1 most), token 3
# prefers expert 1.
_HAND = np.array([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 5.0]]], np.float32)


@pytest.mark.parametrize("prioritized,expert_0_token", [(False, 0), (True, 1)])
def test_capacity_one_keeps_the_first_or_the_most_confident_token(prioritized, expert_0_token):
  dispatch, combine = _np(top_k(jnp.asarray(_HAND), 1, 1, prioritized))
  expected = np.zeros((1, 4, 2, 1), np.float32)
  expected[0, expert_0_token, 0, 0] = 1
  expected[0, 3, 1, 0] = 1
  np.testing.assert_array_equal(dispatch, expected)
  probs = _softmax(_HAND)
  np.testing.assert_allclose(combine[0, expert_0_token, 0, 0], probs[0, expert_0_token, 0],
                             rtol=1e-6)


def test_top_2_first_choices_take_slots_before_second_choices():
  # Token 0 ranks expert 0 then 1; token 1 ranks expert 1 then 0.
  logits = jnp.asarray([[[2.0, 1.0], [1.0, 2.0]]])
  dispatch, _ = _np(top_k(logits, 2, capacity=1))
  np.testing.assert_array_equal(dispatch[0, :, :, 0], [[1, 0], [0, 1]])  # second choices dropped
  dispatch, _ = _np(top_k(logits, 2, capacity=2))
  slot = np.argmax(dispatch[0], axis=-1)  # [token, expert]
  np.testing.assert_array_equal(slot, [[0, 1], [1, 0]])


# ----------------------------------------------------------------------------- losses
def _numpy_losses(logits, k, mask):
  probs = _softmax(logits.astype(np.float64))
  chosen = np.zeros_like(probs)
  np.put_along_axis(chosen, np.argsort(-probs, axis=-1)[..., :k], 1.0, axis=-1)
  balance = []
  for g in range(logits.shape[0]):
    m = mask[g]
    f = chosen[g][m].mean(axis=0)
    p = probs[g][m].mean(axis=0)
    balance.append(logits.shape[-1] * np.sum(f * p))
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  return np.mean(balance), np.mean(lse[mask] ** 2)


@pytest.mark.parametrize("k", [1, 2])
def test_losses_match_numpy(random_logits, k):
  mask = np.ones(random_logits.shape[:2], bool)
  mask[1, 7:] = False
  balance, z_loss = _numpy_losses(random_logits, k, mask)
  result = top_k(jnp.asarray(random_logits), k, 2, token_mask=jnp.asarray(mask))
  np.testing.assert_allclose(result.load_balancing_loss, balance, rtol=1e-5)
  np.testing.assert_allclose(result.router_z_loss, z_loss, rtol=1e-5)
  np.testing.assert_allclose(router_z_loss(jnp.asarray(random_logits)),
                             _numpy_losses(random_logits, k, np.ones_like(mask))[1], rtol=1e-5)


def test_uniform_routing_has_load_balancing_loss_one():
  mask = np.eye(EXPERTS, dtype=np.float32)[np.arange(8) % EXPERTS][None]  # [1, 8, E]
  uniform = np.full((1, 8, EXPERTS), 1 / EXPERTS, np.float32)
  np.testing.assert_allclose(load_balancing_loss(jnp.asarray(uniform), jnp.asarray(mask)), 1.0,
                             rtol=1e-6)
  # Token i sure of expert i % E: the fractions and (by symmetry) the mean probabilities are 1/E.
  result = top_k(jnp.asarray(10.0 * mask), 1, 2)
  np.testing.assert_allclose(result.load_balancing_loss, 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- expert choice
def test_expert_choice_takes_capacity_best_tokens_and_never_masked_ones(random_logits):
  mask = np.ones(random_logits.shape[:2], bool)
  mask[1, 2:] = False  # group 1 has only 2 routable tokens
  result = expert_choice(jnp.asarray(random_logits), 3, token_mask=jnp.asarray(mask))
  dispatch, combine = _np(result)
  per_expert = dispatch.sum(axis=(1, 3))
  np.testing.assert_array_equal(per_expert[0], 3)
  np.testing.assert_array_equal(per_expert[1], 2)
  assert dispatch[~mask].sum() == 0 and dispatch.sum(axis=1).max() <= 1
  probs = _softmax(random_logits)
  for e in range(EXPERTS):
    best = set(np.argsort(-probs[0, :, e])[:3])
    assert set(np.nonzero(dispatch[0, :, e].sum(-1))[0]) == best
  np.testing.assert_allclose(combine, dispatch * probs[..., None], rtol=1e-6)
  assert float(result.load_balancing_loss) == 0.0


# ----------------------------------------------------------------------------- config, groups
@pytest.mark.parametrize("args,expected", [((8, 4, 16), (2, 16)), ((6, 4, 16), (2, 12)),
                                           ((8, 4, 4), (8, 4)), ((2, 10, 4), (10, 2)),
                                           ((3, 7, 3), (21, 1))])
def test_token_groups(args, expected):
  assert token_groups(*args) == expected


@pytest.mark.parametrize("args", [(8, 4, 0), (0, 4, 16), (2, -1, 8)])
def test_token_groups_refuses_impossible_shapes(args):
  with pytest.raises(MoeConfigError, match="token_groups"):
    token_groups(*args)


def test_capacity_and_sparse_layers():
  cfg = MoeConfig()
  assert [i for i in range(6) if cfg.is_sparse(i)] == [1, 3, 5]
  assert all(MoeConfig(layer_interval=1).is_sparse(i) for i in range(3))
  assert cfg.capacity(16, deterministic=False) == 4  # ceil(16 * 1.25 / 8) = 3 < min 4
  assert cfg.capacity(64, deterministic=True) == 16
  assert MoeConfig(num_selected_experts=2).capacity(64, deterministic=False) == 20
  choice = MoeConfig(router="expert_choice")
  assert choice.capacity(64, True) == 16 and choice.capacity(2, True) == 2


@pytest.mark.parametrize("field,value", [
    ("num_experts", 0), ("layer_interval", 0), ("expert_mlp_dim", 0), ("router", "hash"),
    ("num_selected_experts", 9), ("train_capacity_factor", 0.0), ("eval_capacity_factor", -1.0),
    ("min_expert_capacity", 0), ("router_jitter", 1.0), ("max_group_size", 0),
    ("load_balancing_weight", -0.1), ("router_z_loss_weight", -1.0), ("normalize_gates", "yes")])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(MoeConfigError, match=f"MoeConfig.{field}: expected"):
    MoeConfig(**{field: value})


# ----------------------------------------------------------------------------- the layer
# One input shape and one parameter tree for every layer test: [8, 4, embed] in groups of one
# sequence (max_group_size 4), so eager ops compile once and no test pays for `init`.
def _layer(activations=("gelu", "linear"), **overrides):
  settings = dict(num_experts=EXPERTS, max_group_size=4, min_expert_capacity=1)
  settings.update(overrides)
  return MoeLayer(MoeConfig(**settings), MLP, activations)


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(1).normal(size=(8, 4, EMBED)), jnp.float32)


def _abstract_variables(layer, x):
  return jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x))


@pytest.fixture(scope="module")
def params(x):
  """Random unboxed parameters {'router': ..., 'expert': ...} of the gated layer."""
  rng = np.random.default_rng(2)
  shapes = nn.unbox(_abstract_variables(_layer(), x))["params"]
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[-2]), jnp.float32), shapes)


@pytest.mark.parametrize("activations,kernels", [(("gelu", "linear"), ("wi_0", "wi_1", "wo")),
                                                 (("relu",), ("wi", "wo"))])
def test_parameter_tree_and_axes(x, activations, kernels):
  boxed = _abstract_variables(_layer(activations), x)["params"]
  specs = nn.get_partition_spec(boxed)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, nn.unbox(boxed))
  expected = {"router": {"kernel": (EMBED, EXPERTS)}}
  expected["expert"] = {name: {"kernel": (EXPERTS, EMBED, MLP)} for name in kernels[:-1]}
  expected["expert"]["wo"] = {"kernel": (EXPERTS, MLP, EMBED)}
  assert shapes == expected
  assert specs["router"]["kernel"] == PartitionSpec("embed", "unmodeled")
  assert specs["expert"][kernels[0]]["kernel"] == PartitionSpec("moe_expert", "embed", "mlp")
  assert specs["expert"]["wo"]["kernel"] == PartitionSpec("moe_expert", "mlp", "embed")


def test_expert_mlp_dim_overrides_the_dense_mlp_dim(x):
  shapes = _abstract_variables(_layer(expert_mlp_dim=12), x)["params"]["expert"]
  assert nn.unbox(shapes)["wo"]["kernel"].shape == (EXPERTS, 12, EMBED)


def test_expert_kernels_scale_by_the_per_expert_fan_in():
  kernel = np.asarray(expert_kernel_init(jax.random.PRNGKey(0), (4, 64, 32), jnp.float32))
  assert abs(kernel.std() * np.sqrt(64) - 1.0) < 0.05  # not sqrt(4 * 64)


def test_dropped_tokens_output_zero_and_metrics_are_sown(x, params):
  layer = _layer(train_capacity_factor=0.1, eval_capacity_factor=0.1)  # capacity 1
  out, state = layer.apply({"params": params}, x, mutable=["intermediates"])
  logits = jnp.einsum("gsd,de->gse", x, params["router"]["kernel"])  # a group = a sequence
  dispatch, _ = _np(top_k(logits, 1, 1))
  routed = dispatch.sum(axis=(2, 3)) > 0  # [8, 4]
  out = np.asarray(out)
  assert 8 <= routed.sum() < 32
  assert (out[~routed] == 0).all() and (np.abs(out[routed]).sum(-1) > 0).all()
  sown = state["intermediates"]
  assert set(sown) == {"load_balancing_loss", "router_z_loss", "fraction_dropped", "expert_load"}
  assert all(len(v) == 1 for v in sown.values())
  assert sown["load_balancing_loss"][0].shape == () and sown["router_z_loss"][0].shape == ()
  np.testing.assert_allclose(sown["fraction_dropped"][0], 1 - routed.sum() / 32, rtol=1e-6)
  per_expert = dispatch.sum(axis=(0, 1, 3))
  assert sown["expert_load"][0].shape == (EXPERTS,)
  np.testing.assert_allclose(sown["expert_load"][0], per_expert / per_expert.sum(), rtol=1e-6)


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_masked_tokens_are_not_routed(x, params, router):
  mask = np.arange(4)[None, :] < np.array([4, 3, 2, 1, 4, 4, 1, 2])[:, None]  # [8, 4]
  layer = _layer(router=router, eval_capacity_factor=float(EXPERTS))
  out, state = layer.apply({"params": params}, x, jnp.asarray(mask), mutable=["intermediates"])
  out = np.asarray(out)
  assert (out[~mask] == 0).all() and (np.abs(out[mask]).sum(-1) > 0).all()
  np.testing.assert_allclose(state["intermediates"]["fraction_dropped"][0], 0.0, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(router="top_k", num_selected_experts=1),
                                       dict(router="top_k", num_selected_experts=2),
                                       dict(router="expert_choice")])
def test_identical_experts_reproduce_the_dense_mlp(x, params, overrides):
  dense_params = {name: {"kernel": params["expert"][name]["kernel"][0]}
                  for name in ("wi_0", "wi_1", "wo")}
  identical = {"router": params["router"], "expert": jax.tree_util.tree_map(
      lambda k: jnp.broadcast_to(k, (EXPERTS,) + k.shape), dense_params)}
  layer = _layer(normalize_gates=True, eval_capacity_factor=float(EXPERTS), **overrides)
  out = layer.apply({"params": identical}, x)
  dense = layers.MlpBlock(MLP, ("gelu", "linear")).apply({"params": dense_params}, x)
  # Two code paths of ours, not exact: gates sum to 1 up to rounding, and dispatch/combine
  # einsums sum in another order. Worst seen 2.4e-7 at |out| up to 3.95.
  np.testing.assert_allclose(out, dense, atol=1e-5, rtol=1e-5)


class _Block(nn.Module):
  """A block whose feed-forward, named `mlp`, is a MoeLayer."""
  config: MoeConfig

  @nn.compact
  def __call__(self, x):
    return x + MoeLayer(self.config, MLP, ("gelu", "linear"), name="mlp")(x)


class _Blocks(nn.Module):
  config: MoeConfig

  @nn.compact
  def __call__(self, x):
    for i in (1, 3):
      x = _Block(self.config, name=f"layers_{i}")(x)
    return x


def test_router_losses_and_metrics_weights_the_sown_losses(x, params):
  cfg = MoeConfig(num_experts=EXPERTS, max_group_size=4, min_expert_capacity=1,
                  load_balancing_weight=0.5, router_z_loss_weight=0.25)
  variables = {"params": {f"layers_{i}": {"mlp": params} for i in (1, 3)}}
  _, state = _Blocks(cfg).apply(variables, x, mutable=["intermediates"])
  loss, metrics = router_losses_and_metrics(state["intermediates"], cfg)
  sown = [state["intermediates"][f"layers_{i}"]["mlp"] for i in (1, 3)]
  balance = sum(float(s["load_balancing_loss"][0]) for s in sown)
  z_loss = sum(float(s["router_z_loss"][0]) for s in sown)
  np.testing.assert_allclose(loss, 0.5 * balance + 0.25 * z_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["load_balancing_loss"], balance, rtol=1e-6)
  np.testing.assert_allclose(metrics["router_z_loss"], z_loss, rtol=1e-6)
  dropped = [float(s["fraction_dropped"][0]) for s in sown]
  np.testing.assert_allclose(metrics["fraction_dropped"], np.mean(dropped), rtol=1e-6)
  np.testing.assert_allclose(metrics["fraction_dropped/layers_3"], dropped[1], rtol=1e-6)
  np.testing.assert_allclose(metrics["expert_load_max/layers_1"],
                             np.max(sown[0]["expert_load"][0]), rtol=1e-6)
  assert balance > 0 and z_loss > 0 and len(metrics) == 7
  empty_loss, empty = router_losses_and_metrics({"encoder": {"other": (1.0,)}}, cfg)
  assert float(empty_loss) == 0.0 and empty == {}


def test_router_jitter_only_in_training(x, params):
  variables = {"params": params}
  layer = _layer(router_jitter=0.5)
  plain = _layer().apply(variables, x)
  # Exact: without training the jitter is skipped in Python, so the same program runs.
  np.testing.assert_array_equal(layer.apply(variables, x), plain)
  noisy = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.array_equal(noisy, plain)
  assert noisy.shape == x.shape and np.isfinite(np.asarray(noisy)).all()


# ----------------------------------------------------------------------------- sharding
RULES = (("batch", ("data", "expert")), ("moe_expert", "expert"), ("moe_group", "data"),
         ("mlp", "model"), ("embed", None))


def test_sharded_equals_unsharded(x, params):
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ("data", "expert", "model"))
  layer = _layer(num_selected_experts=2, min_expert_capacity=2)
  variables = {"params": params}
  expected = layer.apply(variables, x)
  specs = nn.get_partition_spec(_abstract_variables(layer, x))
  param_shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  wo_spec = param_shardings["params"]["expert"]["wo"]["kernel"].spec
  assert wo_spec == PartitionSpec("expert", "model", None)
  x_sharding = NamedSharding(mesh, PartitionSpec(("data", "expert"), None, None))
  apply = jax.jit(layer.apply, in_shardings=(param_shardings, x_sharding))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    out = apply(variables, x)
  assert out.sharding.spec[0] == ("data", "expert")
  # Two code paths of ours, not exact: partitioned matmuls may sum in another order. Worst seen
  # 1.2e-7 at |out| up to 2.1.
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
