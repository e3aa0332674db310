"""Routing: E library experts run at once over one frozen backbone, their outputs mixed per token
(and per routed module) or per example, inside one compiled program.

A routed model is an `EncoderDecoderModel` built with `RoutedExperts` (an `ExpertSet` plus the
router's `top_k` and `temperature`) in place of the experts' set. Its `params` are the backbone
alone (with the layer-norm scales the experts train: their values there are never read); the
stacked experts come as the `experts` collection (leaves [E, ...] at their usual paths, the tree
`ExpertStack` holds) and what routes them as the `routing` collection (`RoutingInputs`):

- at a `layers.Kernel` (`kernel_output`): y = x @ W + sum_e w_e(x) delta_e(x), with delta_e the
  expert's change (`ExpertKind.kernel_delta`: LoRA's s (x a_e) b_e, IA3's y (l_e - 1));
- after a sub-layer (`sublayer_output`): h + sum_e w_e(h) delta_e(h) (adapters:
  up_e(gelu(down_e(h))), `ExpertKind.sublayer_delta`);
- at a layer norm an expert trains (`layer_norm_scale`): the normalised input times
  sum_e w_e scale_e.

Weights w [rows, length or 1, E] sum to 1 over experts, so each is the mixture of the experts'
own outputs. Where the `routing` collection holds a router for the site the weights are per
token: the top_k scores, softmax(score / temperature) over them, 0 elsewhere; the scores are
|<x, p_e>| for Arrow's `prototypes` [E, in], and <standardise(x), standardise(g_e)> for
PHATGOOSE's `gates` [E, in] (Muqeeth et al. 2024; standardise: minus the mean over features,
over their standard deviation; a constant vector, a zero gate included, standardises to 0).
Elsewhere (every site, for
per-example methods; layer norms and modules without a router, for per-token ones) they are
the example's weights, `example_weights` [N, E], the same for its tokens (each of the N
examples' decoder rows, N x C choices, take its weights).

Cost: every expert's change is computed at every routed site and weighted (a top-k gather of
the experts' parameters per token would save work only when E is much larger than k and the
changes are large; for LoRA and adapter experts the change of one expert costs about 2 x rank
(or 2 x bottleneck) multiply-adds per input feature, small against the backbone's projection,
so computing all E costs E such changes per token). One forced expert (weights one-hot) gives
that expert's outputs: w = 1 and 0 are exact, but the routed pass runs the backbone once and
the E changes as one batched product where the expert alone runs its merged model (LoRA:
x W + s (x a) b against x (W + s a b)), so scores agree to float32 rounding (a few ulps), and
decoded tokens agree exactly unless a top-2 margin falls within it.

The routed model serves scoring (`EncoderDecoderModel.routed_choice_log_likelihoods`) and
decoding (`routed_predictions`: at every step of the decoder; an example's beams are its
consecutive decoder rows and take its weights).

Gathering (`RoutedExperts.gathered` = k): where the weights are per example only (no per-token
router: 'forced', 'retrieval' with top_k, any [N, E] weights with at most k experts an example),
each example's k heaviest experts are gathered from the stack ([N, k, ...] parameters a routed
module) and only their changes computed, weighted by the example's shares; the scorer and the
decoder choose it when k x (examples a batch) < E, i.e. when the gathered copies are fewer
than the E experts computing every change would read (`RoutingInputs.gather_size`). It gives
the all-E mixture's outputs (the dropped experts weigh exactly 0) to float32 rounding.

Gate training (`RoutedExperts.gate_training`, PHATGOOSE's second stage, `training/gates.py`):
each expert runs alone (a stack of one) and its change at every routed module is scaled by its
own gate, w(x) = sigmoid(<x, g>), unnormalised: the module's output is base + sigmoid(<x, g>)
delta(x). Every site where the expert changes the output needs a gate then (`gate_sites`
lists them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elm_jax import tree_paths
from elm_jax.errors import UserInputError
from elm_jax.models.experts import ExpertSet

Array = jax.Array
EXPERTS, ROUTING = "experts", "routing"


class RoutingError(UserInputError):
  """Experts or settings routing cannot run: a kind it cannot route, a bad top_k or
  temperature, weights of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class RoutedExperts(ExpertSet):
  """The experts' configurations (as `ExpertSet`) run routed: the model creates no expert
  parameter (they come stacked in the `experts` collection) and mixes the experts' changes
  with weights from the `routing` collection (module docstring). Per-token routers keep the
  `top_k` best experts of each token and weight them by softmax(score / `temperature`)."""
  top_k: int = 1
  temperature: float = 1.0
  # PHATGOOSE's gate training: sites with `gates` weigh an expert's change by sigmoid(<x, g>).
  gate_training: bool = False
  # > 0: per-example weights only, each example's `gathered` heaviest experts gathered from the
  # stack and only theirs computed (module docstring, "Gathering").
  gathered: int = 0

  @classmethod
  def over(cls, experts, top_k: int = 1, temperature: float = 1.0, gate_training: bool = False,
           gathered: int = 0) -> "RoutedExperts":
    """`experts` (configs or an `ExpertSet`) routed; refuses kinds that cannot be routed and
    a top_k or temperature that is not positive. `gate_training`: the model gate training
    runs (module docstring); `gathered`: experts gathered per example (0: every expert
    computed)."""
    plain = ExpertSet.of(experts)
    for config in plain.configs:
      refusal = config.expert_kind.routing_refusal
      if refusal:
        raise RoutingError(f"{config.kind} experts cannot be routed: {refusal}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
      raise RoutingError(f"top_k: expected a positive integer, got {top_k!r}")
    if not temperature > 0:
      raise RoutingError(f"temperature: expected a positive number, got {temperature!r}")
    return cls(plain.configs, top_k, float(temperature), bool(gate_training), int(gathered))

  @property
  def plain(self) -> ExpertSet:
    """The same configurations, not routed: the model the experts were trained and stored on."""
    return ExpertSet(self.configs)

  def trains(self, path: str) -> bool:
    return False  # every parameter of a routed model is the backbone's

  def kernel(self, module, kernel: Array) -> Array:
    return kernel

  def kernel_output(self, module, kernel: Array, x: Array, y: Array) -> Array:
    params = _tree_at(module, EXPERTS)
    if not params:
      return y
    if self.gathered:
      return _gathered_output(module, params, (x, y), y, [
          lambda p, xy, c=c: c.expert_kind.kernel_delta(c, module, p, kernel, *xy) for c in self.configs])
    deltas = [jax.vmap(lambda p, c=c: c.expert_kind.kernel_delta(c, module, p, kernel, x, y))(params)
              for c in self.configs]
    deltas = [d for d in deltas if d is not None]
    _record_site(module.path, x, deltas)
    return _mix(y, deltas, self._weights(module, module.path, x)) if deltas else y

  def sublayer_output(self, module, site: str, h: Array) -> Array:
    params = _tree_at(module, EXPERTS)
    if not params:
      return h
    if self.gathered:
      return _gathered_output(module, params, h, h, [
          lambda p, hh, c=c: c.expert_kind.sublayer_delta(c, module, site, p, hh) for c in self.configs])
    deltas = [jax.vmap(lambda p, c=c: c.expert_kind.sublayer_delta(c, module, site, p, h))(params)
              for c in self.configs]
    deltas = [d for d in deltas if d is not None]
    _record_site(module.path + (site,), h, deltas)
    return _mix(h, deltas, self._weights(module, module.path + (site,), h)) if deltas else h

  def layer_norm_scale(self, module, x: Array, scale: Array) -> Array:
    stacked = (_tree_at(module, EXPERTS) or {}).get("scale")
    if stacked is None:
      return scale
    if self.gathered:
      routing = _tree_at(module, ROUTING, ())
      picked = stacked.astype(jnp.float32)[routing["example_experts"]]  # [N, k, d]
      mixed = jnp.einsum("nk,nkd->nd", routing["example_shares"].astype(jnp.float32), picked)
      return jnp.repeat(mixed, x.shape[0] // mixed.shape[0], axis=0)[:, None, :]
    weights = _example_weights(module, x.shape[0])                     # [rows, 1, E]
    return jnp.einsum("rle,ed->rld", weights, stacked.astype(jnp.float32))

  def _weights(self, module, key: tuple[str, ...], x: Array) -> Array:
    """[rows, length or 1, E] float32 weights at the site `key` whose input is x [rows, length, in]."""
    router = _tree_at(module, ROUTING, key) or {}
    valid = _tree_at(module, ROUTING, ())["valid"]                      # [E] bool
    x32 = x.astype(jnp.float32)
    if "gates" in router:
      gates = router["gates"].astype(jnp.float32)                       # [E, in]
      if self.gate_training:
        return jax.nn.sigmoid(jnp.einsum("rli,ei->rle", x32, gates))
      scores = jnp.einsum("rli,ei->rle", standardise(x32), standardise(gates))
      return top_k_weights(scores, valid, self.top_k, self.temperature)
    if self.gate_training:
      raise ValueError(f"gate training: no gate at the routed module {'/'.join(key)}")
    if "prototypes" not in router:
      return _example_weights(module, x.shape[0])
    scores = jnp.abs(jnp.einsum("rli,ei->rle", x32, router["prototypes"].astype(jnp.float32)))
    return top_k_weights(scores, valid, self.top_k, self.temperature)


def standardise(v: Array) -> Array:
  """v [..., d] minus its mean over the last axis, over its standard deviation there (0 where
  that is 0: a constant vector standardises to 0), float32."""
  v = v.astype(jnp.float32)
  centred = v - v.mean(-1, keepdims=True)
  std = jnp.sqrt((centred * centred).mean(-1, keepdims=True))
  return jnp.where(std > 0, centred / jnp.where(std > 0, std, 1.0), 0.0)


# The routed modules a trace passes through, {site key: input width}, while `gate_sites` records.
_recorded: Optional[dict] = None


def _record_site(key: tuple[str, ...], x: Array, deltas: Sequence[Array]) -> None:
  if _recorded is not None and deltas:
    _recorded[tuple(key)] = int(x.shape[-1])


@contextlib.contextmanager
def _recording() -> Iterator[dict]:
  global _recorded
  previous, _recorded = _recorded, {}
  try:
    yield _recorded
  finally:
    _recorded = previous


def gate_sites(model, backbone: Any, stacked: Any) -> dict[tuple[str, ...], int]:
  """{site key (a kernel's module path, or a block's path + (site,)): input width} of every
  routed module where an expert of `stacked` (leaves [E, ...], of `model`'s configurations,
  over `backbone`) changes the output: where PHATGOOSE puts a gate. Found by tracing the routed
  model once on a batch of one (no array is computed)."""
  routed = type(model).build(model.config, RoutedExperts.over(model.expert))
  params = routed_backbone(routed, backbone, stacked)
  experts = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct((1,) + tuple(v.shape[1:]), v.dtype), stacked)
  routing = {"example_weights": jax.ShapeDtypeStruct((1, 1), jnp.float32),
             "valid": jax.ShapeDtypeStruct((1,), jnp.bool_)}
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  with _recording() as found:
    jax.eval_shape(lambda p, e, r, t: routed.choice_log_likelihoods(p, t, t[:, None], collections={
        "experts": e, "routing": r}), params, experts, routing, tokens)
  return dict(sorted(found.items()))


def gate_routers(gates: Sequence[dict]) -> dict:
  """The `routing` collection's PHATGOOSE routers from each of E experts' gates ({site key
  joined by '/': [in]}): {module path: {'gates': [E, in] float32}}, a zero gate (scoring 0)
  where an expert has none."""
  found: dict[str, int] = {}
  for g in gates:
    for key, value in g.items():
      found.setdefault(key, int(np.shape(value)[0]))
  routers = {tuple(key.split("/")) + ("gates",): np.stack(
      [np.asarray(g[key], np.float32) if key in g else np.zeros(dim, np.float32) for g in gates])
      for key, dim in found.items()}
  if not routers:
    raise RoutingError("PHATGOOSE: the experts' gates are empty")
  return tree_paths.unflatten(routers)


def top_k_weights(scores: Array, valid: Array, top_k: int, temperature: float) -> Array:
  """scores [..., E], valid [E] bool -> weights [..., E]: softmax(score / temperature) over the
  top_k valid experts of each row, 0 elsewhere (ties: the lower expert index first)."""
  num = scores.shape[-1]
  scores = jnp.where(valid, scores, -jnp.inf)
  values, indices = jax.lax.top_k(scores, min(top_k, num))
  shares = jax.nn.softmax(values / temperature, axis=-1)
  shares = jnp.where(jnp.isfinite(values), shares, 0.0)
  return jnp.einsum("...k,...ke->...e", shares, jax.nn.one_hot(indices, num, dtype=shares.dtype))


def _mix(base: Array, deltas: Sequence[Array], weights: Array) -> Array:
  """base [rows, length, out] + sum_e weights[..., e] delta[e] (deltas: per kind, [E, rows,
  length, out])."""
  if not deltas:
    return base
  total = deltas[0]
  for d in deltas[1:]:
    total = total + d
  # One contraction over experts (a dot XLA batches over rows), not a broadcast product summed
  # over E: on CPU the latter ran 2.4x slower for per-example weights (the demo's uniform
  # mixture, 47 ms against 20 ms a batch) and 1.3x for per-token ones.
  if weights.shape[1] == 1:
    return base + jnp.einsum("re,erlo->rlo", weights[:, 0].astype(total.dtype), total)
  return base + jnp.einsum("rle,erlo->rlo", weights.astype(total.dtype), total)


def _gathered_output(module, params: Any, inputs: Any, base: Array, deltas: Sequence[Any]) -> Array:
  """base [rows, length, out] plus, for each example, its k gathered experts' changes weighted
  by its shares (`example_experts` [N, k], `example_shares` [N, k] in the `routing`
  collection): each change function (p, inputs) -> [G, length, out] or None (per kind) runs on
  one expert's parameters p and one example's G rows of `inputs` (leaves [rows, ...])."""
  routing = _tree_at(module, ROUTING, ())
  chosen, shares = routing["example_experts"], routing["example_shares"]  # [N, k]
  n = chosen.shape[0]
  if base.shape[0] % n:
    raise ValueError(f"routing: {base.shape[0]} rows cannot be the rows of {n} examples")
  picked = jax.tree_util.tree_map(lambda v: v[chosen], params)           # leaves [N, k, ...]
  grouped = jax.tree_util.tree_map(lambda v: v.reshape((n, v.shape[0] // n) + v.shape[1:]), inputs)
  total = None
  for delta in deltas:
    per_example = jax.vmap(lambda p, rows, d=delta: jax.vmap(lambda q: d(q, rows))(p))(picked, grouped)
    if per_example is not None:                                          # [N, k, G, length, out]
      total = per_example if total is None else total + per_example
  if total is None:
    return base
  mixed = jnp.einsum("nk,nk...->n...", shares.astype(total.dtype), total)
  return base + mixed.reshape(base.shape)


def _tree_at(module, collection: str, path: Optional[tuple[str, ...]] = None) -> Any:
  """The subtree of `collection` at `path` (default: `module.path`), from the root of the
  model's variables; None when there is none."""
  tree = module.scope.root.variables().get(collection)
  for name in module.path if path is None else path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _example_weights(module, rows: int) -> Array:
  """The example weights [N, E] repeated for `rows` rows (G consecutive rows an example: its
  encoder row, or its C choices' decoder rows) -> [rows, 1, E] float32."""
  weights = _tree_at(module, ROUTING, ())["example_weights"].astype(jnp.float32)
  if rows % weights.shape[0]:
    raise ValueError(f"routing: {rows} rows cannot be the rows of {weights.shape[0]} examples")
  return jnp.repeat(weights, rows // weights.shape[0], axis=0)[:, None, :]


# ---------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class RoutingInputs:
  """What routes a stack of E experts besides the experts: each example's weights
  `example_weights` [N, E] (rows sum to 1) and the per-token routers, {module path:
  {'prototypes': [E, in]}} (`routers`, empty for per-example methods)."""
  example_weights: np.ndarray
  routers: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    w = np.asarray(self.example_weights, np.float32)
    if w.ndim != 2 or not np.all(np.isfinite(w)) or (w < 0).any() or not np.allclose(w.sum(1), 1, atol=1e-5):
      raise RoutingError(f"example weights: expected [examples, experts] non-negative rows summing to 1, "
                         f"got shape {list(w.shape)}")
    self.example_weights = w

  @property
  def num_experts(self) -> int:
    return self.example_weights.shape[1]

  def experts_per_example(self) -> int:
    """The most experts one example gives weight to (E for per-token methods)."""
    if self.routers:
      return self.num_experts
    return int(max((self.example_weights > 0).sum(1).max(initial=0), 1))

  def gather_size(self, examples_per_batch: int) -> int:
    """The experts to gather per example (`RoutedExperts.gathered`) for batches of
    `examples_per_batch` examples: k, the most experts an example weights, when gathering k
    experts for each of the batch's examples touches fewer expert copies than computing all E
    (k x examples < E, per-example weights only); else 0, every expert computed."""
    k = self.experts_per_example()
    return k if not self.routers and k * examples_per_batch < self.num_experts else 0

  def variables(self, examples: Sequence[Optional[int]], padded_experts: Optional[int] = None,
                gathered: int = 0) -> dict:
    """The `routing` collection for a batch whose rows hold `examples` (indices; None: a
    padding row, given uniform weights), over the E experts padded to `padded_experts` (the
    padding experts get weight 0 and no token's vote); with `gathered` = k, each example's k
    heaviest experts `example_experts` [N, k] int32 and their weights `example_shares` [N, k]."""
    num = self.num_experts
    total = padded_experts or num
    rows = np.stack([self.example_weights[n] if n is not None else np.full(num, 1 / num, np.float32)
                     for n in examples])
    weights = np.zeros((len(examples), total), np.float32)
    weights[:, :num] = rows
    out = tree_paths.unflatten({p: _pad_rows(np.asarray(v, np.float32), total)
                                for p, v in tree_paths.flatten(self.routers).items()})
    out.update(example_weights=weights, valid=np.arange(total) < num)
    if gathered:
      order = np.argsort(-weights, axis=1, kind="stable")[:, :gathered].astype(np.int32)
      out.update(example_experts=order, example_shares=np.take_along_axis(weights, order, axis=1))
    return out


def _pad_rows(x: np.ndarray, total: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], total - len(x), axis=0)]) if total > len(x) else x


def uniform_weights(num_examples: int, num_experts: int) -> np.ndarray:
  """[N, E] all 1 / E: the uniform mixture, routing's counterpart of averaging experts."""
  return np.full((num_examples, num_experts), 1.0 / num_experts, np.float32)


def forced_weights(num_examples: int, num_experts: int, expert: int) -> np.ndarray:
  """[N, E] one-hot on `expert`: top-1 routing with that expert forced."""
  if not 0 <= expert < num_experts:
    raise RoutingError(f"forced expert: expected an index below {num_experts}, got {expert}")
  out = np.zeros((num_examples, num_experts), np.float32)
  out[:, expert] = 1.0
  return out


def arrow_routers(experts, stacked: Any) -> dict:
  """Arrow's prototypes of every expert of `stacked` (leaves [E, ...]; `experts` their configs
  or `ExpertSet`): {module path: {'prototypes': [E, in] float32}} (an expert without a
  module there: a zero vector, scoring 0). Refuses a kind Arrow cannot route, saying why."""
  plain = ExpertSet.of(experts)
  for config in plain.configs:
    if config.expert_kind.arrow_refusal:
      raise RoutingError(f"Arrow cannot route {config.kind} experts: {config.expert_kind.arrow_refusal}")
  flat = tree_paths.flatten(stacked)
  num = int(next(iter(flat.values())).shape[0])
  found: dict[tuple, dict[int, np.ndarray]] = {}
  for e in range(num):
    own = {p: np.asarray(v[e]) for p, v in flat.items()}
    for config in plain.configs:
      for path, vector in config.expert_kind.arrow_prototypes(config, own).items():
        found.setdefault(path, {})[e] = vector
  routers = {}
  for path, per_expert in found.items():
    dim = len(next(iter(per_expert.values())))
    routers[path + ("prototypes",)] = np.stack([per_expert.get(e, np.zeros(dim)) for e in range(num)]
                                               ).astype(np.float32)
  if not routers:
    raise RoutingError("Arrow: the experts add no module to take a prototype from")
  return tree_paths.unflatten(routers)


def routed_backbone(model, backbone: Any, stacked: Any) -> dict:
  """The routed `model`'s params: `backbone` plus the backbone parameters the experts train
  (layer-norm scales, absent from the frozen backbone), taken from expert 0 (a routed model
  reads the experts' own, mixed, from the `experts` collection)."""
  flat = tree_paths.flatten(backbone)
  experts = tree_paths.flatten(stacked)
  for path in tree_paths.flatten(model.abstract_params()[0]):
    if path not in flat:
      flat[path] = np.asarray(experts[path][0])
  return tree_paths.unflatten(flat)
