"""Merging experts: pure functions from k expert parameter trees to one expert tree.

The experts are an `ExpertStack` (leaves [k, ...], as loaded from a library: merged without
being unstacked) or a sequence of k expert trees. An expert tree is what `split_params` returns
for one expert: a nested dict of arrays such as
`encoder/layers_0/mlp_adapter/up_kernel` [bottleneck, embed],
`encoder/layers_0/pre_mlp_layer_norm/scale` [embed], or the LoRA factors
`encoder/layers_0/attention/query/lora_a` [in, rank] and `.../query/lora_b` [rank, out].
Every function returns a tree with the same nesting holding numpy float32 arrays (computed in
float64), and refuses experts whose leaf sets or shapes differ.

- `merge_uniform`: the paper's merge (ELM_NOTES §5): every trainable tensor, adapter weights and
  biases and layer-norm scales alike, is set to the arithmetic mean over the experts.
- `merge_weighted`: the same with non-negative weights normalised to sum to 1.
- `task_arithmetic` (Ilharco et al. 2023) and `merge_ties` (Yadav et al. 2023) work on task
  vectors `expert - base`; `identity_base` builds the usual base (each added module at its
  kind's identity, every other leaf at its pretrained value).
- `merge_by_kind`: a merge of the experts' kind's own (`ExpertKind.merge_methods`), such as
  LoRA's `lora_factors` and `lora_updates`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from elm_jax import tree_paths
from elm_jax.expert_stack import ExpertStack
from elm_jax.models.experts import ExpertConfig, MergeError

__all__ = ["MergeError", "identity_base", "merge_by_kind", "merge_ties", "merge_uniform", "merge_weighted",
           "task_arithmetic"]
Tree = dict
Path = tree_paths.Path


# ------------------------------------------------------------------ validation
def _check_same_leaves(reference: Mapping[Path, Any], flat: Mapping[Path, Any], name: str,
                       reference_name: str = "expert 0") -> None:
  """Raise `MergeError` at the first path (in sorted order) that `flat` lacks, adds or reshapes."""
  for path in sorted(set(reference) ^ set(flat)):
    where = "is missing" if path in reference else f"is not in {reference_name}"
    raise MergeError(f"{name}: parameter {tree_paths.join(path)!r} {where}; every expert must "
                     f"hold the same parameters")
  for path in sorted(reference):
    want, got = np.shape(reference[path]), np.shape(flat[path])
    if want != got:
      raise MergeError(f"{name}: parameter {tree_paths.join(path)!r} has shape {got}, expected "
                       f"{want} (its shape in {reference_name})")


def _stack(experts: ExpertStack | Sequence[Mapping]) -> dict[Path, np.ndarray]:
  """An expert stack, or k expert trees (checked to match), -> {path: float64 [k, *leaf_shape]}."""
  if isinstance(experts, ExpertStack):
    return {path: np.asarray(v, np.float64) for path, v in sorted(tree_paths.flatten(experts.params).items())}
  if isinstance(experts, Mapping):
    raise MergeError("experts: expected a sequence of expert trees, got a single tree (a mapping)")
  if len(experts) == 0:
    raise MergeError("experts: expected at least one expert tree, got none")
  flats = [tree_paths.flatten(expert) for expert in experts]
  if not flats[0]:
    raise MergeError("expert 0: holds no parameters")
  for i, flat in enumerate(flats[1:], start=1):
    _check_same_leaves(flats[0], flat, f"expert {i}")
  return {path: np.stack([np.asarray(flat[path], np.float64) for flat in flats])
          for path in sorted(flats[0])}


def _normalised_weights(weights: Optional[Sequence[float]], k: int) -> np.ndarray:
  """[k] float64 weights summing to 1; uniform when `weights` is None."""
  if weights is None:
    return np.full((k,), 1.0 / k)
  w = np.asarray(weights, np.float64)
  if w.shape != (k,):
    raise MergeError(f"weights: expected {k} weights (one per expert), got shape {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
    raise MergeError(f"weights: expected finite non-negative numbers, not all zero, got {w.tolist()}")
  return w / w.sum()


def _stack_with_base(experts: Sequence[Mapping], base: Mapping) -> tuple[dict, dict]:
  """({path: [k, ...]} experts, {path: [...]} base), base checked against expert 0."""
  stacked = _stack(experts)
  flat_base = tree_paths.flatten(base)
  _check_same_leaves({p: v[0] for p, v in stacked.items()}, flat_base, "base")
  return stacked, {p: np.asarray(v, np.float64) for p, v in flat_base.items()}


def _tree(flat: Mapping[Path, np.ndarray]) -> Tree:
  """float32 leaves; a value beyond float32's range becomes +-Inf, which `merged` refuses to
  save, naming the tensor (so no overflow warning is printed here)."""
  with np.errstate(over="ignore"):
    return tree_paths.unflatten({p: np.asarray(v, np.float32) for p, v in flat.items()})


# ------------------------------------------------------------------ averaging
def _weighted_mean(experts: Sequence[Mapping], weights: Optional[Sequence[float]]) -> dict:
  """{path: sum_i w_i * expert_i [leaf_shape]} with weights normalised (uniform when None)."""
  stacked = _stack(experts)
  w = _normalised_weights(weights, len(experts))
  return {p: np.tensordot(w, v, axes=1) for p, v in stacked.items()}


def merge_uniform(experts: Sequence[Mapping]) -> Tree:
  """The paper's merge: every leaf (adapters, LoRA factors, layer norms) set to its mean."""
  return _tree(_weighted_mean(experts, None))


def merge_weighted(experts: Sequence[Mapping], weights: Sequence[float]) -> Tree:
  """sum_i w_i * expert_i for every leaf, with `weights` [k] >= 0 normalised to sum to 1."""
  return _tree(_weighted_mean(experts, weights))


# ------------------------------------------------------------------ task vectors
def identity_base(expert: Mapping, expert_config: ExpertConfig,
                  pretrained_backbone: Optional[Mapping] = None) -> Tree:
  """The starting point of `expert`'s leaves (an expert of `expert_config`), for task vectors
  `expert - base`.

  A leaf of a module the kind adds (adapter weights, LoRA factors, learned scales) takes the kind's
  identity (`ExpertKind.identity`: 0, or 1 for a scale), the value at which the module leaves
  the backbone unchanged; every other leaf (layer-norm scales; everything for full fine-tuning)
  takes its value in `pretrained_backbone`, the full pretrained parameter tree (not the backbone
  half of `split_params`, which has no layer norms), or 0 without it.
  """
  kind = expert_config.expert_kind
  backbone = tree_paths.flatten(pretrained_backbone) if pretrained_backbone is not None else None
  base = {}
  for path, value in tree_paths.flatten(expert).items():
    name = tree_paths.join(path)
    if kind.adds(name):
      base[path] = np.full(np.shape(value), kind.identity(name), np.float32)
      continue
    if backbone is None:
      base[path] = np.zeros(np.shape(value), np.float32)
      continue
    if path not in backbone:
      raise MergeError(f"pretrained_backbone: parameter {name!r} is missing; pass the full pretrained tree")
    if np.shape(backbone[path]) != np.shape(value):
      raise MergeError(f"pretrained_backbone: parameter {name!r} has shape "
                       f"{np.shape(backbone[path])}, expected {np.shape(value)}")
    base[path] = np.asarray(backbone[path], np.float32)
  return tree_paths.unflatten(base)


def task_arithmetic(experts: Sequence[Mapping], base: Mapping, scale: float = 1.0) -> Tree:
  """base + scale * sum_i (expert_i - base) for every leaf.

  With scale 1/k this is `merge_uniform`, whatever the base.
  """
  stacked, flat_base = _stack_with_base(experts, base)
  return _tree({p: flat_base[p] + scale * (v - flat_base[p]).sum(axis=0)
                for p, v in stacked.items()})


def _trim(tau: np.ndarray, density: float) -> np.ndarray:
  """[k, ...] task vectors -> the same with all but each expert's top ceil(density * n) entries
  by magnitude zeroed, per tensor (n = entries of one expert's leaf; ties broken by index)."""
  k = tau.shape[0]
  flat = tau.reshape(k, -1)
  keep = int(np.ceil(density * flat.shape[1]))
  order = np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :keep]
  mask = np.zeros(flat.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return np.where(mask, flat, 0.0).reshape(tau.shape)


def merge_ties(experts: Sequence[Mapping], base: Mapping, density: float = 0.2,
               scale: float = 1.0) -> Tree:
  """TIES-Merging (Yadav et al. 2023): base + scale * merged task vector, leaf by leaf.

  tau_i = expert_i - base; trim: keep each tau_i's top `density` fraction of entries by magnitude
  (ceil(density * n) of a leaf's n entries, per tensor and per expert); elect: sign of the sum of
  the trimmed tau_i per coordinate; disjoint mean: the mean of the nonzero trimmed entries whose
  sign matches the elected one, 0 where none does. With density 1 and identical experts the
  merge returns the expert.
  """
  if not 0.0 < density <= 1.0:
    raise MergeError(f"density: expected a fraction in (0, 1], got {density}")
  stacked, flat_base = _stack_with_base(experts, base)
  merged = {}
  for path, values in stacked.items():
    trimmed = _trim(values - flat_base[path], density)
    elected = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(axis=0)
    mean = np.where(agree, trimmed, 0.0).sum(axis=0) / np.maximum(count, 1)
    merged[path] = flat_base[path] + scale * mean
  return _tree(merged)


# ------------------------------------------------------------------ a kind's own merges
def merge_by_kind(experts: Sequence[Mapping], expert_config: ExpertConfig, method: str,
                  weights: Optional[Sequence[float]] = None) -> tuple[Tree, dict[str, Any]]:
  """`method`, one of the merges of `expert_config`'s kind (`ExpertKind.merge_methods`; LoRA's
  `lora_factors` and `lora_updates`), over the k experts with `weights` (uniform by default)
  -> (merged tree, the changes to the ExpertConfig the merged expert is saved with)."""
  kind = expert_config.expert_kind
  if method not in kind.merge_methods:
    raise MergeError(f"--method={method}: the experts are {kind.name!r} experts, whose own merges are "
                     f"{list(kind.merge_methods) or 'none'}")
  stacked = _stack(experts)
  merged, changes = kind.merge(method, stacked, _normalised_weights(weights, next(iter(stacked.values())).shape[0]))
  return _tree(merged), changes
