"""The model seam (t5x's `BaseModel`): what training, evaluation and retrieval ask of a T5.

`EncoderDecoderModel` wraps the Flax `Transformer` and defines, once, everything done with it:

- `loss`: token cross-entropy of a teacher-forced batch (plus the weighted router losses of a
  Mixture-of-Experts model), with its metrics;
- `choice_log_likelihoods`: rank classification, the sum of each answer choice's token
  log-probabilities (EOS included) given the input;
- `predict`: greedy or beam decoding with a KV cache;
- `encode_mean`: the mean-pooled, L2-normalised encoder output (retrieval by the backbone).

Those take the full parameter tree. The model also owns its experts (`models.experts`: one
configuration, or one per kind for a stack of several kinds) stacked E at a time over one
frozen backbone, the one form training, evaluation and planning hold them in: their
initialisation (`init_experts`), their parameter list (`expert_shapes`), their logical axes
(`expert_specs`: `expert` first), and `expert_losses`, `expert_choice_log_likelihoods` and
`expert_predictions`, each of every expert at once (vmapped over the leading axis of [E, ...]
leaves), and `routed_choice_log_likelihoods` and `routed_predictions`, the experts routed (mixed
per token or per example, `models/routing.py`) in one pass. Every method is a pure function of
its arrays, so callers jit it with the model as a static argument (it is hashable). The model
knows nothing of meshes or optimizers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from elm_jax import tree_paths
from elm_jax.models import decoding
from elm_jax.models.experts import ExpertConfig, ExpertSet, merge_params, split_params
from elm_jax.models.moe import router_losses_and_metrics
from elm_jax.models.t5 import Transformer, init_params, logical_axes
from elm_jax.models.t5_config import T5Config

Array = jax.Array
Batch = dict[str, Array]


def shift_right(targets: Array, start_id: int) -> Array:
  """Decoder inputs from targets [..., length]: the start token, then targets[..., :-1]."""
  start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)


VOCAB_CHUNK = 8192  # output-projection columns per piece in `projected_token_log_likelihoods`


def projected_token_log_likelihoods(hidden: Array, kernel: Array, targets: Array, dtype=jnp.float32,
                                    chunk: int = VOCAB_CHUNK) -> Array:
  """log softmax(hidden @ kernel)[target] per position, never holding the [..., vocab] logits:
  hidden [..., emb], kernel [emb, vocab], targets [...] -> [...] float32. The target's logit is
  the dot product with its kernel column; the log-sum-exp runs over `chunk` columns at a time
  with a running maximum (logits of one chunk at a time are alive: [..., chunk] float32)."""
  emb, vocab = kernel.shape
  hidden, kernel = hidden.astype(dtype), kernel.astype(dtype)
  target_logits = jnp.einsum("...e,...e->...", hidden, jnp.take(kernel.T, targets, axis=0),
                             preferred_element_type=jnp.float32)
  pieces = -(-vocab // chunk)
  if pieces == 1:
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return target_logits - jax.nn.logsumexp(logits, axis=-1)
  padded = jnp.pad(kernel, ((0, 0), (0, pieces * chunk - vocab))).reshape(emb, pieces, chunk)
  real = (jnp.arange(pieces * chunk) < vocab).reshape(pieces, chunk)

  def piece(carry, inputs):
    running_max, running_sum = carry
    columns, valid = inputs
    logits = jnp.where(valid, jnp.dot(hidden, columns, preferred_element_type=jnp.float32), -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
    return (new_max, running_sum), None
  start = (jnp.full(hidden.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(hidden.shape[:-1], jnp.float32))
  (running_max, running_sum), _ = jax.lax.scan(piece, start, (jnp.moveaxis(padded, 1, 0), real))
  return target_logits - (running_max + jnp.log(running_sum))


@jax.custom_vjp
def token_nll(logits: Array, targets: Array) -> tuple[Array, Array]:
  """logits [..., vocab], targets [...] -> (negative log-likelihood of each target [...] float32,
  whether the target's logit is a largest one [...] bool).

  The same numbers as `-log_softmax(logits)[target]`, with a hand-written gradient: the
  cotangent of the logits is `(softmax - one_hot(target)) * d_nll`, formed in one pass over the
  logits, where autodiff of log_softmax and take_along_axis builds a dense one-hot cotangent,
  scatters into it and then takes the softmax's backward on top. The second output spares the
  metric an argmax pass over the vocabulary; in an exact tie for the largest logit it counts the
  target as correct where argmax would pick the first. Measured in `bench/train_step_variants.py`."""
  return _token_nll_forward(logits, targets)[0]


def _token_nll_forward(logits: Array, targets: Array):
  x = logits.astype(jnp.float32)
  top = jnp.max(x, axis=-1)
  log_normalizer = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return (log_normalizer - target_logit, target_logit >= top), (logits, targets, log_normalizer)


def _token_nll_backward(residuals, cotangents):
  logits, targets, log_normalizer = residuals
  d_nll = cotangents[0]  # the second output is boolean: it has no cotangent
  one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
  d_logits = (jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None]) - one_hot) * d_nll[..., None]
  return d_logits.astype(logits.dtype), None


token_nll.defvjp(_token_nll_forward, _token_nll_backward)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array, Array]:
  """Token cross-entropy [batch, length, vocab] vs [batch, length] -> (mean loss over weighted
  tokens, correct-token count, token count). Mean over tokens, as the paper's HF loss."""
  nll, correct = token_nll(logits, targets)
  tokens = jnp.sum(weights)
  loss = jnp.sum(nll * weights) / jnp.maximum(tokens, 1.0)
  return loss, jnp.sum(correct * weights), tokens


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """A T5 (`module`) and the computations every part of elm_jax runs with it."""
  module: Transformer

  @classmethod
  def build(cls, config: T5Config, expert: ExpertConfig | ExpertSet | None = None) -> "EncoderDecoderModel":
    """The model of `config` carrying experts of `expert` (a config, a set of one per kind, or
    None for the backbone alone)."""
    return cls(Transformer(config, ExpertSet.of(expert)))

  @property
  def config(self) -> T5Config:
    return self.module.config

  @property
  def expert(self) -> Optional[ExpertSet]:
    return ExpertSet.of(self.module.expert)

  # ------------------------------------------------------------------ parameters
  def init_params(self, rng: Array) -> dict:
    """Randomly initialised parameters of the backbone and the experts' modules (one expert)."""
    return nn.unbox(init_params(self.config, rng, expert=self.expert))

  def param_specs(self) -> Any:
    """The logical axes of every parameter of `init_params`, a tree of `PartitionSpec`s."""
    return _param_specs(self.module)

  def split_params(self, params: dict) -> tuple[dict, dict]:
    """A full tree -> (frozen backbone, one expert's tree); the expert is empty without experts."""
    return (params, {}) if self.expert is None else split_params(params, self.expert)

  def abstract_params(self) -> tuple[Any, Any]:
    """(frozen backbone, one expert) as `jax.ShapeDtypeStruct` trees: no arrays are made."""
    return self.split_params(_abstract_params(self.module))

  def expert_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The exact tensors one expert holds, {'encoder/layers_0/mlp_adapter/up_kernel':
    ShapeDtypeStruct((bottleneck, embed), float32), ...} in sorted order: what training writes
    and the model reads."""
    return {tree_paths.join(p): jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
            for p, v in sorted(tree_paths.flatten(self.abstract_params()[1]).items())}

  def expert_specs(self) -> tuple[Any, Any]:
    """(logical specs of the frozen backbone, of stacked experts: `expert`, then each leaf's
    own axes)."""
    backbone, expert = self.split_params(self.param_specs())
    stacked = jax.tree_util.tree_map(lambda spec: PartitionSpec("expert", *spec), expert,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
    return backbone, stacked

  def init_experts(self, pretrained: dict, num_experts: int, seed: int,
                   shared_init: bool = True) -> tuple[dict, dict]:
    """(frozen backbone, E experts stacked [E, ...] as numpy float32) over `pretrained`, the
    full backbone tree. Modules the experts add (adapters, LoRA factors, ...) take their
    kind's initialisation from `seed`, the same draw for every expert (`shared_init`, as the
    paper's runs), or from `seed + e` for expert e; backbone tensors an expert trains
    (layer-norm scales, or everything for full fine-tuning) start from the pretrained values."""
    def fresh_expert(seed_e):
      return self.split_params(self.init_params(jax.random.PRNGKey(seed_e)))[1]

    seeds = np.arange(seed, seed + num_experts, dtype=np.uint32)
    shapes = tree_paths.flatten(jax.eval_shape(jax.vmap(fresh_expert), seeds))
    given = tree_paths.flatten(pretrained)
    flat = {p: np.broadcast_to(np.asarray(given[p], np.float32), shapes[p].shape).copy()
            for p in shapes if p in given}
    if len(flat) < len(shapes):
      # Compiled (eager initialisation dispatches every op on its own). One draw shared by all
      # experts compiles in 1.7 s for the demo's model; a vmapped draw per expert in 4.3 s.
      if shared_init:
        one = tree_paths.flatten(jax.device_get(jax.jit(fresh_expert)(np.uint32(seed))))
        fresh = {p: np.broadcast_to(x, shapes[p].shape) for p, x in one.items()}
      else:
        fresh = tree_paths.flatten(jax.device_get(jax.jit(jax.vmap(fresh_expert))(seeds)))
      flat.update({p: np.asarray(x, np.float32).copy() for p, x in fresh.items() if p not in flat})
    return self.split_params(pretrained)[0], tree_paths.unflatten(flat)

  # ------------------------------------------------------------------ training
  def loss(self, params, batch: Batch, dropout_rng: Optional[Array] = None,
           collections: Optional[dict] = None) -> tuple[Array, dict[str, Array]]:
    """Loss of a batch ({encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
    [decoder_loss_weights]}, each [batch, length]) in training mode: dropout and router jitter
    draw from `dropout_rng` (needed only when they are on); Mixture-of-Experts layers use their
    training capacity and add their weighted router losses. Metrics: loss, token accuracy,
    tokens; for MoE also `cross_entropy`, the router losses and drop and load figures.
    `collections`: variables beside `params` (a routed model's `experts` and `routing`: gate
    training, `training/gates.py`)."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    inputs = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    variables = {"params": params, **(collections or {})}
    moe = self.config.moe
    if moe is None:
      logits = self.module.apply(variables, *inputs, deterministic=False, rngs=rngs)
    else:
      logits, state = self.module.apply(variables, *inputs, deterministic=False, rngs=rngs,
                                        mutable=["intermediates"])
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0).astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, correct, tokens = cross_entropy(logits, targets, weights)
    metrics = {"loss": loss, "accuracy": correct / jnp.maximum(tokens, 1.0), "tokens": tokens}
    if moe is not None:
      # Switch load balancing + ST-MoE z-loss, weighted, on top of the cross-entropy.
      auxiliary, router_metrics = router_losses_and_metrics(state, moe)
      metrics.update(router_metrics, cross_entropy=loss)
      loss = loss + auxiliary
      metrics["loss"] = loss
    return loss, metrics

  # ------------------------------------------------------------------ evaluation
  def encode(self, params, encoder_tokens: Array, segment_ids: Optional[Array] = None,
             collections: Optional[dict] = None) -> tuple[Array, Array]:
    """(encoder outputs [N, Li, emb], mask [N, Li]) of tokens [N, Li] (0 = padding; packed
    rows: `segment_ids`, see `Encoder`). `collections`: variables beside `params` (a routed
    model's `experts` and `routing`, `models/routing.py`)."""
    mask = encoder_tokens != self.config.pad_id
    return self.module.apply({"params": params, **(collections or {})}, encoder_tokens, mask,
                             segment_ids=segment_ids, method=Transformer.encode), mask

  def choice_log_likelihoods(self, params, encoder_tokens: Array, choice_targets: Array,
                             encoder_segments: Optional[Array] = None,
                             scored_positions: Optional[Array] = None,
                             collections: Optional[dict] = None) -> Array:
    """encoder_tokens [N, Li] (EOS included, 0 = padding), choice_targets [N, C, Lt] (EOS
    included, 0 = padding) -> [N, C] float32: the sum of each choice's token log-probabilities,
    teacher-forced. Each input is encoded once and shared by its C choices.

    Packed inputs: encoder_tokens [R, P] hold S inputs a row, told apart by `encoder_segments`
    [R, P] (s + 1 for the row's s-th input, 0 = padding), and choice_targets [R x S, C, Lt] has
    the choices of row r's s-th input at r x S + s (an input absent from its row: all padding,
    scored 0). Scores equal the unpacked ones to float32 rounding; the encoder runs on R x P
    positions instead of R x S x (longest input).

    `scored_positions` [K] int32: the flat indices into choice_targets [N x C x Lt] of its
    non-padding tokens (in any order; entries of N x C x Lt or more are padding, ignored). Only
    those K positions go through the output projection and its log-softmax, the largest single
    cost of a short choice; None: all N x C x Lt. `collections`: variables beside `params`
    (`routed_choice_log_likelihoods`)."""
    cfg = self.config
    n, c, lt = choice_targets.shape
    encoded, mask = self.encode(params, encoder_tokens, encoder_segments, collections)
    # The C choice rows of an input share its encoder output: cross-attention projects its keys
    # and values once per input, not once per choice (`MultiHeadAttention`'s shared rows).
    targets = choice_targets.reshape(n * c, lt)
    row_segments = None
    if encoder_segments is not None:
      per_row = n // encoder_tokens.shape[0]
      if per_row * encoder_tokens.shape[0] != n:
        raise ValueError(f"choice_log_likelihoods: {n} rows of choices cannot be {encoder_tokens.shape[0]} "
                         "packed input rows' inputs")
      row_segments = (jnp.arange(n * c) // c) % per_row + 1
    hidden, kernel = self.module.apply({"params": params, **(collections or {})}, encoded, mask,
                                       shift_right(targets, cfg.decoder_start_id), project=False,
                                       encoder_segments=encoder_segments, row_segments=row_segments,
                                       method=Transformer.decode)
    if scored_positions is None:
      scored_positions = jnp.arange(n * c * lt)
    flat_targets = jnp.take(targets.reshape(-1), scored_positions, mode="clip")
    per_token = projected_token_log_likelihoods(
        jnp.take(hidden.reshape(n * c * lt, -1), scored_positions, axis=0, mode="clip"), kernel, flat_targets,
        cfg.jnp_dtype)
    per_token = per_token * (flat_targets != cfg.pad_id)
    # Padding entries' rows (N x C or more) fall outside the segments: segment_sum drops them.
    return jax.ops.segment_sum(per_token, scored_positions // lt, num_segments=n * c).reshape(n, c)

  def predict(self, params, encoder_tokens: Array, *, max_decode_length: int,
              beam_size: int = 1, collections: Optional[dict] = None) -> tuple[Array, Array]:
    """Greedy (beam_size 1) or beam decoding of encoder_tokens [N, Li] -> (tokens [N,
    max_decode_length], pad after EOS; scores [N]). `collections`: variables beside `params`
    (a routed model's `experts` and `routing`)."""
    if beam_size == 1:
      return decoding.greedy_decode(self.module, params, encoder_tokens, max_decode_length=max_decode_length,
                                    collections=collections)
    return decoding.beam_search(self.module, params, encoder_tokens, beam_size=beam_size,
                                max_decode_length=max_decode_length, collections=collections)

  # ------------------------------------------------------------------ stacked experts
  def expert_losses(self, backbone, experts, batch: Batch, dropout_rngs: Optional[Array] = None
                    ) -> tuple[Array, dict[str, Array]]:
    """`loss` of every expert on its own batch: experts' leaves [E, ...] over `backbone`, batch
    leaves [E, batch, length], dropout_rngs [E, 2] (None: no draws) -> (losses [E], metrics,
    each [E])."""
    def one(expert, expert_batch, rng):
      return self.loss(merge_params(backbone, expert), expert_batch, rng)
    return jax.vmap(one, in_axes=(0, 0, None if dropout_rngs is None else 0))(experts, batch, dropout_rngs)

  def expert_choice_log_likelihoods(self, backbone, experts, encoder_tokens: Array, choice_targets: Array,
                                    encoder_segments: Optional[Array] = None,
                                    scored_positions: Optional[Array] = None) -> Array:
    """`choice_log_likelihoods` of every expert: experts' leaves [E, ...] over `backbone`;
    encoder_tokens [N, Li], choice_targets [N, C, Lt] -> [E, N, C] float32."""
    def one(expert):
      return self.choice_log_likelihoods(merge_params(backbone, expert), encoder_tokens, choice_targets,
                                         encoder_segments, scored_positions)
    return jax.vmap(one)(experts)

  def routed_choice_log_likelihoods(self, backbone, experts, routing, encoder_tokens: Array,
                                    choice_targets: Array, encoder_segments: Optional[Array] = None,
                                    scored_positions: Optional[Array] = None) -> Array:
    """`choice_log_likelihoods` of the experts routed (a model built with
    `routing.RoutedExperts`): the experts' leaves [E, ...] mixed per token or per example as
    the `routing` collection says (`models/routing.py`), over `backbone` (`routing.routed_backbone`);
    encoder_tokens [N, Li] (one input a row), choice_targets [N, C, Lt] -> [N, C] float32."""
    return self.choice_log_likelihoods(backbone, encoder_tokens, choice_targets, encoder_segments,
                                       scored_positions, collections={"experts": experts, "routing": routing})

  def routed_predictions(self, backbone, experts, routing, encoder_tokens: Array, *, max_decode_length: int,
                         beam_size: int = 1) -> tuple[Array, Array]:
    """`predict` by the experts routed (a model built with `routing.RoutedExperts`; arguments as
    `routed_choice_log_likelihoods`'): every decoding step mixes the experts per token or per
    example -> (tokens [N, max_decode_length], scores [N])."""
    return self.predict(backbone, encoder_tokens, max_decode_length=max_decode_length, beam_size=beam_size,
                        collections={"experts": experts, "routing": routing})

  def expert_predictions(self, backbone, experts, encoder_tokens: Array, *, max_decode_length: int,
                         beam_size: int = 1) -> tuple[Array, Array]:
    """`predict` by every expert: experts' leaves [E, ...] over `backbone`, encoder_tokens
    [N, Li] -> (tokens [E, N, max_decode_length], scores [E, N])."""
    def one(expert):
      return self.predict(merge_params(backbone, expert), encoder_tokens, max_decode_length=max_decode_length,
                          beam_size=beam_size)
    return jax.vmap(one)(experts)

  # ------------------------------------------------------------------ retrieval
  def encode_mean(self, params, tokens: Array) -> Array:
    """tokens [N, L] (0 = padding) -> the mean of the encoder outputs over real tokens,
    L2-normalised: [N, emb] float32."""
    hidden, mask = self.encode(params, tokens)
    weights = mask[..., None].astype(jnp.float32)
    pooled = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=64)
def _abstract_params(module: Transformer) -> Any:
  """The parameters of `module` (unboxed) as `jax.ShapeDtypeStruct`s, traced once per module."""
  return jax.eval_shape(lambda: nn.unbox(init_params(module.config, jax.random.PRNGKey(0), expert=module.expert)))


@functools.lru_cache(maxsize=64)
def _param_specs(module: Transformer) -> Any:
  """The logical axes of `module`'s parameters (`t5.logical_axes`), traced once per module."""
  return logical_axes(module.config, module.expert)
