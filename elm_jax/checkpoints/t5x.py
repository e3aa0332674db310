"""T5X checkpoints (legacy msgpack + TensorStore, and Orbax) into our parameter tree.

T5X checkpoints carry no config.json; the model config comes from gin. Our parameter tree has
the T5X layout, so T5X's `target/...` arrays map onto `param_shapes(config)` by name.

Legacy layout (t5x `Checkpointer`, e.g. the public T5 1.1 LM-adapted
`gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_xl/checkpoint_1100000/`): a directory
`checkpoint_<step>/` holding
  - `checkpoint`: a msgpack file (flax.serialization) of `{'version': 3, 'optimizer': state}`
    (version 0 files are `state` itself), where `state = {'target': params, 'state': {'step',
    'param_states'}}`. Arrays written inline use flax's ndarray ext type; arrays written to
    TensorStore are replaced by the JSON form of their `tensorstore.Spec`, e.g.
    `{'driver': 'zarr', 'dtype': 'float32', 'kvstore': {'driver': 'file', 'path':
    'target.encoder.layers_0.attention.query.kernel'}, 'metadata': {'compressor': {'id':
    'gzip'}, 'shape': [...], 'chunks': [...]}}` with a path relative to the checkpoint directory
    (`{'driver': 'gcs', 'bucket': 't5x-dummy-bucket', ...}` when written to GCS; before
    tensorstore 0.1.14 the `path` sat beside `kvstore`). Older Orbax-written files use the
    string `'PLACEHOLDER://<dotted name>'` instead.
  - one zarr array directory per spec (`.zarray` + chunk files such as `0.0`), named by the
    parameter's dotted path.

Orbax layout: a PyTree checkpoint directory (`_METADATA`, OCDBT files), possibly an item
(`default/`, `state/`...) of a CheckpointManager step directory `<step>/`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from elm_jax.checkpoints.hf import (CheckpointError, Path, check_param_shapes, format_path,
                                    load_hf_checkpoint, unflatten_tree)
from elm_jax.models.t5 import param_shapes
from elm_jax.models.t5_config import T5Config

FORMATS = ("hf", "t5x_legacy", "orbax")
_MSGPACK_FILE = "checkpoint"
_ORBAX_TREE_MARKER = "_METADATA"
_ORBAX_STEP_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt", "manifest.ocdbt")
_ORBAX_ITEM_NAMES = ("default", "state", "params", "target", "model")
_PLACEHOLDER = "PLACEHOLDER://"
_PARAM_ROOT_KEYS = frozenset(("token_embedder", "encoder", "decoder"))
_GIN_HINT = ("pass the model config, e.g. from a gin model file "
             "(--gin_file=gin_configs/models/t5_1_1_large.gin)")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
  """What `load_checkpoint` found: config, parameter tree (our layout), and where from."""
  config: T5Config
  params: dict
  format: str
  path: str
  vocab_path: Optional[str] = None


# -------------------------------------------------------------------------- locating
def _is_orbax_tree(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _ORBAX_TREE_MARKER))


def _is_checkpoint_dir(path: str) -> bool:
  if any(os.path.isfile(os.path.join(path, n))
         for n in ("config.json", _MSGPACK_FILE, _ORBAX_TREE_MARKER) + _ORBAX_STEP_MARKERS):
    return True
  return any(_is_orbax_tree(os.path.join(path, n)) for n in _subdirs(path))


def _subdirs(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def resolve_checkpoint_dir(path: str) -> str:
  """The checkpoint directory `path` names.

  `path` may be the checkpoint directory, the msgpack file `checkpoint` in it, or a parent
  holding `checkpoint_<N>` (T5X) or `<N>` (Orbax CheckpointManager) step directories, of which
  the largest N is chosen (and logged).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: checkpoint path not found")
  if os.path.isfile(path):
    if os.path.basename(path) == _MSGPACK_FILE:
      return os.path.dirname(os.path.abspath(path))
    raise CheckpointError(f"{path}: expected a checkpoint directory (or its msgpack file named "
                          f"'{_MSGPACK_FILE}'), found another file")
  if _is_checkpoint_dir(path):
    return path
  steps = []
  for name in _subdirs(path):
    match = re.fullmatch(r"(?:checkpoint_)?(\d+)", name)
    if match and _is_checkpoint_dir(os.path.join(path, name)):
      steps.append((int(match.group(1)), name))
  if not steps:
    return path
  chosen = os.path.join(path, max(steps)[1])
  log.info("%s: %d checkpoint step(s) found; using the latest, %s", path, len(steps), chosen)
  return chosen


def detect_checkpoint_format(path: str) -> str:
  """'hf' (config.json + safetensors), 't5x_legacy' (msgpack `checkpoint`) or 'orbax'."""
  path = resolve_checkpoint_dir(path)
  names = set(os.listdir(path))
  if "config.json" in names:
    return "hf"
  if _ORBAX_TREE_MARKER in names or any(_is_orbax_tree(os.path.join(path, n))
                                        for n in _subdirs(path)):
    return "orbax"
  if _MSGPACK_FILE in names:
    return "t5x_legacy"
  if any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in names):
    return "hf"  # load_hf_checkpoint explains what is missing (config.json, or a pickle)
  raise CheckpointError(
      f"{path}: not a recognised checkpoint: expected config.json (Hugging Face), a msgpack "
      f"file named '{_MSGPACK_FILE}' (T5X), or an Orbax checkpoint ({_ORBAX_TREE_MARKER}), or "
      "a directory of checkpoint_<N> step directories")


def _find_params(tree: Any, source: str) -> tuple[Mapping[str, Any], Path]:
  """The parameter subtree of a restored state: under `optimizer`, `target`, `params`, or root."""
  node, prefix = tree, ()
  while isinstance(node, Mapping) and not _PARAM_ROOT_KEYS & set(node):
    key = next((k for k in ("optimizer", "target", "params") if k in node), None)
    if key is None:
      break
    node, prefix = node[key], prefix + (key,)
  if not isinstance(node, Mapping) or not _PARAM_ROOT_KEYS & set(node):
    keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
    raise CheckpointError(
        f"{source}: no T5 parameters found (looked under 'optimizer', 'target', 'params' and "
        f"the root for token_embedder/encoder/decoder); keys at /{format_path(prefix)}: {keys}")
  return node, prefix


# --------------------------------------------------------------------- legacy T5X format
def read_t5x_msgpack(ckpt_dir: str) -> dict:
  """The msgpack state dict of a legacy T5X checkpoint directory (TensorStore specs unread)."""
  import msgpack  # pylint: disable=import-outside-toplevel
  from flax import serialization  # pylint: disable=import-outside-toplevel
  file = os.path.join(ckpt_dir, _MSGPACK_FILE)
  try:
    with open(file, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
  if raw.startswith(b"model_checkpoint_path"):
    raise CheckpointError(f"{file}: a TensorFlow checkpoint index, not a T5X msgpack checkpoint; "
                          "convert the TF checkpoint with t5x first")
  try:
    contents = serialization.msgpack_restore(raw)
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise CheckpointError(
        f"{file}: not a T5X msgpack checkpoint ({type(e).__name__}: {e})") from None
  if not isinstance(contents, dict):
    raise CheckpointError(f"{file}: expected a msgpack map at the top level, found "
                          f"{type(contents).__name__}")
  return contents


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, Mapping) and "driver" in leaf and ("kvstore" in leaf or "path" in leaf)


def _flatten_state(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Like flatten_tree, but a TensorStore spec dict is a leaf."""
  flat: dict[Path, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and not _is_spec(value):
      flat.update(_flatten_state(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def _array_dir(ckpt_dir: str, leaf: Any, dotted: str) -> tuple[str, str]:
  """(driver, local directory) of the array a spec or placeholder leaf refers to."""
  if isinstance(leaf, str):
    driver, relative = "zarr", leaf[len(_PLACEHOLDER):]
  else:
    driver = leaf.get("driver", "zarr")
    kvstore = leaf.get("kvstore")
    relative = (kvstore.get("path") if isinstance(kvstore, Mapping) else None) or leaf.get("path")
    relative = relative or dotted
  relative = str(relative).rstrip("/")
  # Relative paths are relative to the checkpoint directory; GCS paths and absolute paths from
  # the machine that wrote the checkpoint fall back to the array's name inside it.
  for candidate in (os.path.join(ckpt_dir, relative),
                    os.path.join(ckpt_dir, os.path.basename(relative))):
    if os.path.isdir(candidate):
      return driver, candidate
  raise CheckpointError(
      f"{ckpt_dir}: the msgpack file refers to array {relative!r} for {dotted}, but "
      f"{os.path.join(ckpt_dir, os.path.basename(relative))} does not exist")


def load_t5x_legacy_params(ckpt_dir: str, config: T5Config, param_dtype=np.float32) -> dict:
  """Parameters (numpy, `param_dtype`, our layout) of a legacy T5X checkpoint directory.

  Only `target` is read; optimizer state (`state/param_states`, `step`) is ignored.
  """
  import tensorstore  # pylint: disable=import-outside-toplevel
  contents = read_t5x_msgpack(ckpt_dir)
  state = contents.get("optimizer", contents)
  if not isinstance(state, Mapping) or "target" not in state:
    keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise CheckpointError(f"{os.path.join(ckpt_dir, _MSGPACK_FILE)}: no 'target' (the "
                          f"parameters) in the state dict; keys: {keys}")
  target, prefix = _find_params(state, os.path.join(ckpt_dir, _MSGPACK_FILE))
  inline: dict[Path, np.ndarray] = {}
  stores: dict[Path, Any] = {}
  for path, leaf in _flatten_state(target).items():
    dotted = ".".join(prefix + path)
    if _is_spec(leaf) or (isinstance(leaf, str) and leaf.startswith(_PLACEHOLDER)):
      driver, directory = _array_dir(ckpt_dir, leaf, dotted)
      spec = {"driver": driver, "kvstore": {"driver": "file", "path": directory}}
      try:
        stores[path] = tensorstore.open(spec, open=True, read=True).result()
      except ValueError as e:
        raise CheckpointError(
            f"{directory}: unreadable {driver} array for {dotted} ({e})") from None
      if stores[path].dtype.numpy_dtype == np.uint16:
        raise CheckpointError(
            f"{directory}: {dotted} is stored as uint16 (T5X checkpoint version 2 bfloat16); "
            "re-save it with a current t5x, which writes native bfloat16")
    elif isinstance(leaf, (np.ndarray, np.generic, int, float)):
      inline[path] = np.asarray(leaf)
    else:
      raise CheckpointError(f"{ckpt_dir}: {dotted} is neither an array nor a TensorStore spec "
                            f"(found {type(leaf).__name__}: {str(leaf)[:80]})")
  shapes = {p: tuple(v.shape) for p, v in inline.items()}
  shapes.update({p: tuple(s.shape) for p, s in stores.items()})
  check_param_shapes(shapes, config, ckpt_dir,
                     hint="does the gin model config match this checkpoint?")
  reads = {p: s.read() for p, s in stores.items()}  # issued together, read in parallel
  flat = {p: np.asarray(v, dtype=param_dtype) for p, v in inline.items()}
  for path, future in reads.items():
    flat[path] = np.asarray(future.result(), dtype=param_dtype)
  return unflatten_tree(flat)


# ------------------------------------------------------------------------- Orbax format
def _orbax_item_dir(path: str) -> str:
  """The PyTree directory in `path`: itself, or one item of a CheckpointManager step."""
  if _is_orbax_tree(path):
    return path
  items = [n for n in _subdirs(path) if _is_orbax_tree(os.path.join(path, n))]
  for name in _ORBAX_ITEM_NAMES:
    if name in items:
      return os.path.join(path, name)
  if len(items) == 1:
    return os.path.join(path, items[0])
  raise CheckpointError(f"{path}: expected an Orbax PyTree checkpoint ({_ORBAX_TREE_MARKER}) here "
                        f"or in one item sub-directory ({', '.join(_ORBAX_ITEM_NAMES)}); found "
                        f"items {items}")


def _metadata_tree(checkpointer, item_dir: str) -> Mapping[str, Any]:
  metadata = checkpointer.metadata(item_dir)
  metadata = getattr(metadata, "item_metadata", metadata)
  tree = getattr(metadata, "tree", metadata)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{item_dir}: Orbax metadata is a {type(tree).__name__}, expected a "
                          "dict-shaped PyTree")
  return tree


def load_orbax_params(ckpt_dir: str, config: T5Config, param_dtype=np.float32) -> dict:
  """Parameters (numpy, `param_dtype`, our layout) of an Orbax PyTree checkpoint.

  Only the parameter subtree (`optimizer/target`, `target`, `params` or the root) is restored.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  item_dir = os.path.abspath(_orbax_item_dir(ckpt_dir))
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = _metadata_tree(checkpointer, item_dir)
    subtree, prefix = _find_params(metadata, item_dir)
    shapes = {p: tuple(getattr(m, "shape", ())) for p, m in _flatten_state(subtree).items()}
    check_param_shapes(shapes, config, item_dir,
                       hint="does the gin model config match this checkpoint?")
    item = unflatten_tree({prefix + p: m for p, m in _flatten_state(subtree).items()})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except (ValueError, OSError, KeyError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(
        f"{item_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
  params, _ = _find_params(restored, item_dir)
  return unflatten_tree({p: np.asarray(v, dtype=param_dtype)
                         for p, v in _flatten_state(params).items()})


# ----------------------------------------------------------------------------- dispatch
def load_t5x_checkpoint(path: str, config: T5Config, param_dtype=np.float32) -> dict:
  """Parameters (numpy, our layout) of a legacy T5X or Orbax checkpoint; `config` from gin."""
  ckpt_dir = resolve_checkpoint_dir(path)
  kind = detect_checkpoint_format(ckpt_dir)
  if kind == "t5x_legacy":
    return load_t5x_legacy_params(ckpt_dir, config, param_dtype)
  if kind == "orbax":
    return load_orbax_params(ckpt_dir, config, param_dtype)
  raise CheckpointError(f"{ckpt_dir}: a Hugging Face checkpoint, not T5X; use load_hf_checkpoint "
                        "or load_checkpoint")


def load_checkpoint(path: str, config: Optional[T5Config] = None,
                    param_dtype=np.float32) -> LoadedCheckpoint:
  """Any supported checkpoint -> LoadedCheckpoint.

  Hugging Face directories bring their config (a `config` passed too must imply the same
  parameter shapes); T5X formats need `config`.
  """
  ckpt_dir = resolve_checkpoint_dir(path)
  kind = detect_checkpoint_format(ckpt_dir)
  if kind == "hf":
    loaded = load_hf_checkpoint(ckpt_dir, param_dtype)
    if config is not None and param_shapes(config) != param_shapes(loaded.config):
      raise CheckpointError(
          f"{os.path.join(ckpt_dir, 'config.json')}: describes a model whose parameter shapes "
          f"differ from the config passed in ({loaded.config} vs {config})")
    return LoadedCheckpoint(loaded.config, loaded.params, kind, ckpt_dir, loaded.vocab_path)
  if config is None:
    raise CheckpointError(f"{ckpt_dir}: a {kind} checkpoint carries no model config; {_GIN_HINT}")
  return LoadedCheckpoint(config, load_t5x_checkpoint(ckpt_dir, config, param_dtype), kind,
                          ckpt_dir)
