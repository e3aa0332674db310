"""Merging library experts into a new library expert (what `elm-jax merge` runs).

The members are loaded once, as one stack (`ExpertLibrary.load_stack`, every file checked),
merged on that stack (`merging`), and the result, checked against its kind's parameter list and
for NaN and Inf (`expert_files.check_tensors`), is saved as an expert of the same kind with
its provenance; rerunning the same merge after an interruption finishes it (adding identical
files is a no-op), while another merge under an existing name is refused before any work.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional, Sequence

from elm_jax import tree_paths
from elm_jax.checkpoints import expert_files
from elm_jax.errors import UserInputError
from elm_jax.library import merging
from elm_jax.library.loaded import load_backbone
from elm_jax.library.store import ExpertLibrary, LibraryError, safe_name
from elm_jax.models.experts import KINDS, ExpertConfig
from elm_jax.models.t5_config import T5Config

# The merges of every kind, then those of one kind (`ExpertKind.merge_methods`).
METHODS = ("uniform", "weighted", "task_arithmetic", "ties") + tuple(
    method for kind in KINDS.values() for method in kind.merge_methods)


def merged_tree(library: ExpertLibrary, names: Sequence[str], method: str, *,
                weights: Optional[Sequence[float]] = None, scale: float = 1.0, density: float = 0.2,
                checkpoint: Optional[str] = None, config: Optional[T5Config] = None):
  """(merged tree, its ExpertConfig as a dict, the first member's metadata)."""
  if method not in METHODS:
    raise UserInputError(f"method: expected one of {METHODS}, got {method!r}")
  stack, metas = library.load_stack(names)
  if not isinstance(stack.expert_config, ExpertConfig):
    raise UserInputError(f"experts {list(names)}: they are of several kinds ({stack.expert_config.label}); "
                         "merge experts of one kind and configuration")
  expert_config = dict(metas[0].expert_config)
  if method == "uniform":
    return merging.merge_uniform(stack), expert_config, metas[0]
  if method == "weighted":
    return merging.merge_weighted(stack, weights), expert_config, metas[0]
  if method not in ("task_arithmetic", "ties"):
    tree, changes = merging.merge_by_kind(stack, stack.expert_config, method, weights)
    return tree, {**expert_config, **changes}, metas[0]
  pretrained = load_backbone(library, checkpoint, config=config)[0].params
  base = merging.identity_base(stack.tree(names[0]), stack.expert_config, pretrained)
  if method == "task_arithmetic":
    return merging.task_arithmetic(stack, base, scale), expert_config, metas[0]
  return merging.merge_ties(stack, base, density, scale), expert_config, metas[0]


def merge_into_library(library: ExpertLibrary, names: Sequence[str], name: str, method: str = "uniform", *,
                       weights: Optional[Sequence[float]] = None, scale: float = 1.0, density: float = 0.2,
                       checkpoint: Optional[str] = None, config: Optional[T5Config] = None) -> dict:
  """Merges the named experts and adds the result to the library as `name`; returns its
  provenance ({merged_from, method, weights, scale, density})."""
  safe_name(name)  # a usable name, checked before any work
  names = list(names)
  provenance = {"merged_from": names, "method": method, "weights": list(weights) if weights else None,
                "scale": scale if method in ("task_arithmetic", "ties") else None,
                "density": density if method == "ties" else None}
  if name in library.names() and library.entry(name).get("provenance") != provenance:
    # The same merge again (a rerun after an interruption) goes on: adding identical files is a
    # no-op. Another merge under this name is refused before any work.
    raise LibraryError(f"--name={name}: the library already holds an expert of that name (not "
                       "this merge); experts are never replaced: choose another --name")
  tree, expert_config, first = merged_tree(library, names, method, weights=weights, scale=scale,
                                           density=density, checkpoint=checkpoint, config=config)
  meta = dataclasses.replace(first, name=name, task="merge:" + ",".join(names), prompt=None,
                             expert_config=expert_config, steps=0, metrics={},
                             training_config={**first.training_config, "merge": provenance})
  flat = {tree_paths.join(p): v for p, v in tree_paths.flatten(tree).items()}
  expert_files.check_tensors(flat, meta, f"--name={name}: the merged expert")  # before anything is saved
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, "merged")
    expert_files.save_expert(directory, tree, meta)
    # No retrieval keys: a merge is chosen by its recipe, and copies of its members' keys would
    # split their votes.
    library.add(directory, name=name, provenance=provenance)
  return provenance
