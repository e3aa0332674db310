"""T5X checkpoints into our parameters: the legacy msgpack + tensorstore layout, and Orbax.

Legacy layout (the public T5 1.1 LM-adapted checkpoints, e.g. `t5_1_1_lm100k_xl/checkpoint_1100000`):
a msgpack file `checkpoint` holding `{"version": V, "optimizer": {"target": params, "state":
{step, param_states}}}` (flax msgpack). Unpartitioned arrays are stored inline; partitioned ones
are replaced by the JSON form of a tensorstore spec (`{"driver": "zarr", "kvstore": {"driver":
"file", "path": "target.encoder.layers_0.attention.query.kernel"}, "metadata": ...}`, path
relative to the checkpoint directory) and live there as gzip-compressed zarr arrays.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np

from elm_jax.checkpoints.hf import CheckpointError
from elm_jax.models.t5_config import T5Config, param_shapes

_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "_sharding")


def _is_orbax_dir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS)


def resolve_checkpoint_dir(path: str) -> str:
  """A directory holding `checkpoint_N` (or Orbax step `N`) sub-directories -> the latest one."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory not found")
  if os.path.isfile(os.path.join(path, "checkpoint")) or os.path.isfile(os.path.join(path, "config.json")) \
      or _is_orbax_dir(path):
    return path
  steps = []
  for name in os.listdir(path):
    match = re.fullmatch(r"(?:checkpoint_)?(\d+)", name)
    if match and os.path.isdir(os.path.join(path, name)):
      steps.append((int(match.group(1)), name))
  if not steps:
    return path
  return os.path.join(path, max(steps)[1])


def detect_checkpoint_format(path: str) -> str:
  """'hf' (config.json + safetensors), 't5x_legacy' (msgpack `checkpoint`) or 'orbax'."""
  path = resolve_checkpoint_dir(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return "t5x_legacy"
  if _is_orbax_dir(path) or any(_is_orbax_dir(os.path.join(path, d)) for d in os.listdir(path)
                                if os.path.isdir(os.path.join(path, d))):
    return "orbax"
  if any(n.endswith((".bin", ".pt", ".pth", ".safetensors")) for n in os.listdir(path)):
    return "hf"  # the HF loader explains what is missing
  raise CheckpointError(
      f"{path}: not a recognised checkpoint: expected config.json (Hugging Face), a msgpack file "
      "named 'checkpoint' (T5X), or an Orbax checkpoint (_METADATA)")


def _spec_relative_path(spec: dict, fallback: str) -> str:
  """The array's path relative to the checkpoint directory, as t5x records it in the spec
  (`kvstore.path` since tensorstore 0.1.14, top-level `path` before)."""
  kvstore = spec.get("kvstore") if isinstance(spec.get("kvstore"), dict) else {}
  path = kvstore.get("path") or spec.get("path") or fallback
  return os.path.basename(path.rstrip("/")) if os.path.isabs(path) else path


def _read_tensorstore(directory: str, spec: dict, fallback_name: str) -> np.ndarray:
  import tensorstore as ts
  array_dir = os.path.join(directory, _spec_relative_path(spec, fallback_name))
  if not os.path.isdir(array_dir):
    raise CheckpointError(f"{os.path.join(directory, 'checkpoint')}: refers to array {fallback_name!r} "
                          f"stored in {array_dir}, which does not exist")
  driver = spec.get("driver", "zarr")
  try:
    store = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": array_dir}},
                    open=True).result()
    return np.asarray(store.read().result())
  except ValueError as e:
    raise CheckpointError(f"{array_dir}: unreadable {driver} array ({e})") from None


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, dict) and "driver" in leaf and ("kvstore" in leaf or "path" in leaf)


def _materialise(tree: Any, directory: str, name: str) -> Any:
  """Replaces tensorstore specs in the restored state dict by the arrays they point to."""
  if _is_spec(tree):
    return _read_tensorstore(directory, tree, name)
  if isinstance(tree, dict):
    return {k: _materialise(v, directory, f"{name}.{k}" if name else k) for k, v in tree.items()}
  return tree


def _target_subtree(state: dict, source: str) -> tuple[dict, str]:
  for path in (("target",), ("optimizer", "target"), ("params",), ("state", "params")):
    node = state
    try:
      for key in path:
        node = node[key]
    except (KeyError, TypeError):
      continue
    return node, ".".join(path)
  if isinstance(state, dict) and "token_embedder" in state:
    return state, ""
  raise CheckpointError(f"{source}: no parameters found (looked for 'target', 'optimizer/target', "
                        f"'params' and a bare parameter tree; top-level keys: {sorted(state)[:8]})")


def read_legacy_state(path: str) -> dict:
  """The full state dict of a legacy T5X checkpoint directory, arrays materialised."""
  from flax import serialization
  file = os.path.join(path, "checkpoint")
  with open(file, "rb") as f:
    try:
      state = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
      raise CheckpointError(f"{file}: not a T5X msgpack checkpoint ({type(e).__name__}: {e})") from None
  return state


def _read_orbax(path: str) -> dict:
  import orbax.checkpoint as ocp
  candidates = [path] + [os.path.join(path, d) for d in sorted(os.listdir(path))
                         if os.path.isdir(os.path.join(path, d))]
  for candidate in candidates:
    if _is_orbax_dir(candidate) and os.path.exists(os.path.join(candidate, "_METADATA")) or \
        os.path.exists(os.path.join(candidate, "manifest.ocdbt")):
      try:
        return ocp.PyTreeCheckpointer().restore(candidate)
      except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{candidate}: unreadable Orbax checkpoint ({e})") from None
  raise CheckpointError(f"{path}: no Orbax PyTree checkpoint found in it or its sub-directories")


def _normalise(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _normalise(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def load_t5x_checkpoint(path: str, config: T5Config) -> dict:
  """Parameters (float32 numpy, our layout) from a legacy T5X or Orbax checkpoint directory."""
  path = resolve_checkpoint_dir(path)
  kind = detect_checkpoint_format(path)
  if kind == "t5x_legacy":
    state = read_legacy_state(path)
    target, _ = _target_subtree(state, os.path.join(path, "checkpoint"))
    params = _materialise(target, path, "target")
  elif kind == "orbax":
    params, _ = _target_subtree(_read_orbax(path), path)
  else:
    raise CheckpointError(f"{path}: a Hugging Face checkpoint; use load_hf_checkpoint")
  params = _normalise(params)
  check_params(params, config, path)
  return params


def check_params(params: dict, config: T5Config, source: str) -> None:
  """Raises CheckpointError naming the first missing, unexpected or mis-shaped parameter."""
  def walk(expected: Any, actual: Any, path: str):
    if isinstance(expected, tuple):
      if not hasattr(actual, "shape"):
        raise CheckpointError(f"{source}: parameter {path} should be an array of shape {expected}")
      if tuple(actual.shape) != expected:
        raise CheckpointError(f"{source}: parameter {path}: expected shape {expected}, found "
                              f"{tuple(actual.shape)} (does the model gin file match the checkpoint?)")
      return
    if not isinstance(actual, dict):
      raise CheckpointError(f"{source}: parameter group {path} is missing")
    for key in expected:
      if key not in actual:
        raise CheckpointError(f"{source}: missing parameter {path}/{key}".replace("//", "/"))
      walk(expected[key], actual[key], f"{path}/{key}" if path else key)
    extra = sorted(set(actual) - set(expected))
    if extra:
      raise CheckpointError(f"{source}: unexpected parameter(s) {', '.join(f'{path}/{e}' if path else e for e in extra)} "
                            "for this model config")
  walk(param_shapes(config), params, "")
