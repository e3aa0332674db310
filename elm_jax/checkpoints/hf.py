"""Hugging Face T5/mT5 checkpoints (safetensors) to and from our T5X-layout parameter tree.

One table, built from the config, maps every Hugging Face tensor name onto a parameter path.
Torch `Linear` weights are stored [out, in] and become our kernels [in, out] by a transpose; the
relative-position tables [buckets, heads] become `rel_embedding` [heads, buckets]. Embedding
[vocab, emb] and layer-norm scales [emb] are copied as they are; `lm_head.weight` [vocab, emb]
becomes `decoder/logits_dense/kernel` [emb, vocab] for untied configs only.

Pickle checkpoints (`pytorch_model.bin`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from elm_jax import files
from elm_jax.errors import UserInputError
from elm_jax.tree_paths import Path
from elm_jax.tree_paths import flatten as flatten_tree
from elm_jax.tree_paths import join as format_path
from elm_jax.tree_paths import unflatten as unflatten_tree
from elm_jax.models.t5 import param_shapes
from elm_jax.models.t5_config import ConfigError, T5Config

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_VOCAB_FILE = "spiece.model"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
# Stand-ins for `shared.weight` (tried in this order when it is absent; ignored otherwise).
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_RAW_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16"}


# What a checkpoint directory written by `save_hf_checkpoint` (or transformers) may hold: only
# such a directory is ever replaced with overwrite=True.
_CHECKPOINT_FILES = (r"config\.json|generation_config\.json|spiece\.model|tokenizer.*|special_tokens_map\.json|"
                     r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")

class CheckpointError(UserInputError):
  """A checkpoint that is missing, malformed, or does not fit the model config (a ValueError)."""


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
  """A loaded Hugging Face directory: config, parameter tree (our layout), vocabulary path."""
  config: T5Config
  params: dict
  vocab_path: Optional[str]
  model_type: str


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where one HF tensor goes: our parameter path, and whether it is stored transposed."""
  path: Path
  transpose: bool

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for a parameter of our `shape`."""
    return tuple(reversed(shape)) if self.transpose else tuple(shape)


# ------------------------------------------------------------------ parameter-tree helpers
def check_param_shapes(found: Mapping[Path, tuple[int, ...]], config: T5Config, source: str,
                       *, hint: str = "") -> None:
  """Compares {parameter path: shape} with `param_shapes(config)`.

  Raises CheckpointError naming `source`, the first unexpected, missing or mis-shaped
  parameter, and the expected and found shapes.
  """
  expected = flatten_tree(param_shapes(config))
  suffix = f" ({hint})" if hint else ""
  for path, shape in found.items():
    if path not in expected:
      raise CheckpointError(
          f"{source}: unexpected parameter {format_path(path)} of shape {tuple(shape)}: the "
          f"model config has no such parameter{suffix}")
  for path, shape in expected.items():  # in model order: the first mismatch is the telling one
    if path in found and tuple(found[path]) != tuple(shape):
      raise CheckpointError(
          f"{source}: parameter {format_path(path)}: expected shape {tuple(shape)}, "
          f"found {tuple(found[path])}{suffix}")
  missing = [p for p in expected if p not in found]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CheckpointError(
        f"{source}: missing parameter {format_path(missing[0])} (expected shape "
        f"{tuple(expected[missing[0]])}){more}{suffix}")


# ------------------------------------------------------------------------- name table
def hf_name_table(config: T5Config) -> dict[str, HFTensor]:
  """HF tensor name -> HFTensor for every parameter of `config` (the canonical names)."""
  table = {"shared.weight": HFTensor(("token_embedder", "embedding"), False)}
  mlp = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
  stacks = (
      ("encoder", config.num_encoder_layers, "encoder_norm",
       (("SelfAttention", "attention", "pre_attention_layer_norm"),)),
      ("decoder", config.num_decoder_layers, "decoder_norm",
       (("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
        ("EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm"))),
  )
  for stack, num_layers, final_norm, attentions in stacks:
    table[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = HFTensor(
        (stack, "relpos_bias", "rel_embedding"), True)
    table[f"{stack}.final_layer_norm.weight"] = HFTensor((stack, final_norm, "scale"), False)
    for i in range(num_layers):
      block, layer = f"{stack}.block.{i}.layer", f"layers_{i}"
      for j, (hf_name, ours, norm) in enumerate(attentions):
        table[f"{block}.{j}.layer_norm.weight"] = HFTensor((stack, layer, norm, "scale"), False)
        for short, long in _ATTENTION:
          table[f"{block}.{j}.{hf_name}.{short}.weight"] = HFTensor(
              (stack, layer, ours, long, "kernel"), True)
      j = len(attentions)
      table[f"{block}.{j}.layer_norm.weight"] = HFTensor(
          (stack, layer, "pre_mlp_layer_norm", "scale"), False)
      for name in mlp:
        table[f"{block}.{j}.DenseReluDense.{name}.weight"] = HFTensor(
            (stack, layer, "mlp", name, "kernel"), True)
  if not config.logits_via_embedding:
    table["lm_head.weight"] = HFTensor(("decoder", "logits_dense", "kernel"), True)
  return table


def _ignorable(name: str, config: T5Config) -> bool:
  """Tensors HF may store that carry nothing of their own for this config (tied copies)."""
  return name in _EMBEDDING_COPIES or (name == "lm_head.weight" and config.logits_via_embedding)


# ----------------------------------------------------------------------------- reading
def read_hf_config(path: str) -> tuple[T5Config, str]:
  """(T5Config, model_type) from `path/config.json`."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory not found")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path}: not found; a Hugging Face checkpoint directory needs "
                          "its config.json next to the weights")
  raw = files.read_json_object(config_path, CheckpointError)
  try:
    return T5Config.from_hf_config(raw, source=config_path), raw.get("model_type", "t5")
  except ConfigError as e:
    raise CheckpointError(str(e)) from None


def _no_weights_error(path: str) -> CheckpointError:
  """The error for a directory without safetensors weights (explaining pickle refusal)."""
  pickles = sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES))
  if pickles:
    return CheckpointError(
        f"{path}: found {', '.join(pickles)} but no {_SINGLE_FILE}. Pickle checkpoints are not "
        "loaded (unpickling runs arbitrary code). Convert once where transformers and torch are "
        "installed: python -c \"from transformers import AutoModelForSeq2SeqLM as M; "
        f"M.from_pretrained('{path}').save_pretrained('OUT_DIR', safe_serialization=True)\"")
  return CheckpointError(f"{path}: neither {_SINGLE_FILE} nor {_INDEX_FILE} found")


def tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it (one file, or shards with an index)."""
  index = os.path.join(path, _INDEX_FILE)
  single = os.path.join(path, _SINGLE_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      items = list(weight_map.items())
    except OSError as e:
      raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(
          f"{index}: expected a JSON object with a 'weight_map' ({e!r})") from None
    files = {}
    for name, shard in items:
      shard_path = os.path.join(path, str(shard))
      if not os.path.isfile(shard_path):
        raise CheckpointError(
            f"{index}: tensor {name!r} is mapped to {shard}, which does not exist")
      files[name] = shard_path
    return files
  if os.path.isfile(single):
    with _open(single) as f:
      return {name: single for name in f.keys()}
  raise _no_weights_error(path)


def _open(file: str):
  """A safetensors handle on `file`. A file that cannot be opened is named with the reason
  first: safetensors reports every failure to open as "No such file or directory"."""
  try:
    with open(file, "rb"):
      pass
  except OSError as e:
    raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_raw(file: str, name: str) -> np.ndarray:
  """One tensor read from the file's header and byte range (for safetensors builds whose numpy
  backend rejects bfloat16)."""
  with open(file, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_size))[name]
    kind = entry["dtype"]
    if kind not in _RAW_DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has dtype {kind}; expected a float type "
                            f"({', '.join(_RAW_DTYPES)})")
    dtype = ml_dtypes.bfloat16 if kind == "BF16" else np.dtype(_RAW_DTYPES[kind])
    start, end = entry["data_offsets"]
    f.seek(8 + header_size + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtype).reshape(entry["shape"])


def _get_tensor(handle, file: str, name: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except TypeError:
    return _read_raw(file, name)
  except SafetensorError as e:
    raise CheckpointError(f"{file}: tensor {name!r} could not be read ({e})") from None


def _stored_shapes(files: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape from the safetensors headers (no tensor data is read)."""
  shapes = {}
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  for file, names in by_file.items():
    with _open(file) as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise CheckpointError(f"{file}: tensor {name!r} is listed in {_INDEX_FILE} but is not "
                                "in this file")
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def _plan(files: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], config: T5Config,
          source: str) -> dict[str, HFTensor]:
  """HF name -> destination for every tensor to read; raises on unexpected, mis-shaped, missing."""
  table = hf_name_table(config)
  expected = flatten_tree(param_shapes(config))
  plan: dict[str, HFTensor] = {}
  for name, file in files.items():
    if name in table:
      plan[name] = table[name]
    elif not _ignorable(name, config):
      raise CheckpointError(
          f"{file}: unexpected tensor {name!r} of shape {shapes[name]}: it maps to no parameter "
          f"of the model described by config.json (layers, feed_forward_proj and "
          f"tie_word_embeddings decide which tensors exist)")
  if "shared.weight" not in files:
    copy = next((n for n in _EMBEDDING_COPIES if n in files), None)
    if copy is not None:
      plan[copy] = table["shared.weight"]
  for name, entry in plan.items():
    want = entry.hf_shape(expected[entry.path])
    if shapes[name] != want:
      raise CheckpointError(
          f"{files[name]}: tensor {name!r} -> parameter {format_path(entry.path)}: expected shape "
          f"{want} (our {tuple(expected[entry.path])}{', transposed' if entry.transpose else ''}), "
          f"found {shapes[name]}")
  covered = {entry.path for entry in plan.values()}
  missing = [(n, e) for n, e in table.items() if e.path not in covered]
  if missing:
    name, entry = missing[0]
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CheckpointError(
        f"{source}: missing tensor {name!r} for parameter {format_path(entry.path)} (expected "
        f"shape {entry.hf_shape(expected[entry.path])}){more}")
  return plan


def load_hf_checkpoint(path: str, param_dtype=np.float32) -> HFCheckpoint:
  """Reads config.json, the safetensors weights and spiece.model from a HF T5/mT5 directory.

  Returns params as numpy arrays of `param_dtype` in the layout of `param_shapes(config)`.
  """
  path = os.fspath(path)
  config, model_type = read_hf_config(path)
  files = tensor_files(path)
  index = os.path.join(path, _INDEX_FILE)
  source = index if os.path.isfile(index) else os.path.join(path, _SINGLE_FILE)
  plan = _plan(files, _stored_shapes(files), config, source)
  by_file: dict[str, list[str]] = {}
  for name in plan:
    by_file.setdefault(files[name], []).append(name)
  flat: dict[Path, np.ndarray] = {}
  for file, names in by_file.items():
    with _open(file) as handle:
      for name in names:
        tensor = _get_tensor(handle, file, name)
        entry = plan[name]
        flat[entry.path] = np.ascontiguousarray(tensor.T if entry.transpose else tensor,
                                                dtype=param_dtype)
  vocab = os.path.join(path, _VOCAB_FILE)
  return HFCheckpoint(config, unflatten_tree(flat), vocab if os.path.isfile(vocab) else None,
                      model_type)


# ----------------------------------------------------------------------------- writing
def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: Optional[int]) -> list[dict]:
  """Greedy packing in table order; a tensor larger than the limit gets a shard of its own."""
  total = sum(t.nbytes for t in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    return [dict(tensors)]
  shards: list[dict] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  return shards


def _write_weights(tensors: Mapping[str, np.ndarray], directory: str,
                   max_shard_bytes: Optional[int]) -> None:
  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, _SINGLE_FILE), metadata={"format": "pt"})
    return
  weight_map = {}
  for k, shard in enumerate(shards, start=1):
    filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
    weight_map.update({name: filename for name in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(directory, _INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)


def save_hf_checkpoint(params: Mapping[str, Any], config: T5Config, path: str, *,
                       model_type: str = "t5", vocab_path: Optional[str] = None,
                       max_shard_bytes: Optional[int] = None, overwrite: bool = False,
                       save_dtype=np.float32) -> None:
  """Writes a HF directory: config.json, model.safetensors (or shards + index past
  `max_shard_bytes`) and spiece.model (copied from `vocab_path`).

  Tensors are written in `save_dtype` under the canonical names of `hf_name_table(config)`:
  `shared.weight`, plus `lm_head.weight` only when untied (as transformers' save_pretrained
  does). Built in a temporary sibling directory and renamed into place; an existing non-empty
  `path` is replaced only with `overwrite=True`.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not os.path.isdir(path):
    raise CheckpointError(f"{path}: exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise CheckpointError(f"{path}: directory exists and is not empty; pass overwrite=True to "
                            "replace it")
    foreign = [f for f in os.listdir(path) if not re.fullmatch(_CHECKPOINT_FILES, f)]
    if foreign or not os.path.isfile(os.path.join(path, "config.json")):
      raise CheckpointError(f"{path}: holds files that are not a Hugging Face checkpoint's "
                            f"({', '.join(sorted(foreign)[:5]) or 'no config.json'}); not replacing it")
  if vocab_path is not None and not os.path.isfile(vocab_path):
    raise CheckpointError(f"{vocab_path}: vocabulary file not found")
  flat = flatten_tree(params)
  check_param_shapes({p: np.shape(v) for p, v in flat.items()}, config, "params to save")
  tensors = {}
  for name, entry in hf_name_table(config).items():
    value = np.asarray(flat[entry.path])
    tensors[name] = np.ascontiguousarray(value.T if entry.transpose else value, dtype=save_dtype)
  hf_config = config.to_hf_config(model_type)
  hf_config["torch_dtype"] = np.dtype(save_dtype).name
  with files.atomic_directory(path, replace=True) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    _write_weights(tensors, tmp, max_shard_bytes)
    if vocab_path is not None:
      shutil.copyfile(vocab_path, os.path.join(tmp, _VOCAB_FILE))
