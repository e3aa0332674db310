"""Hugging Face T5/mT5 checkpoints (safetensors) to and from our T5X-layout parameters.

One table maps every Hugging Face tensor name onto a parameter path, built from the config;
torch `Linear` weights ([out, in]) are transposed into our kernels ([in, out]) and the
relative-position tables ([buckets, heads]) into `rel_embedding` ([heads, buckets]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from elm_jax.errors import UserInputError
from elm_jax.models.t5_config import ConfigError, T5Config, param_shapes


class CheckpointError(UserInputError):
  """A checkpoint that is missing, malformed, or does not fit the model."""


@dataclasses.dataclass
class HFCheckpoint:
  config: T5Config
  params: dict
  vocab_path: Optional[str]
  model_type: str


_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
# Tensors that may be present and carry nothing of their own (tied copies of `shared`).
_IGNORABLE = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_name_table(config: T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our parameter path, transpose?) for every parameter of `config`."""
  table: dict[str, tuple[tuple[str, ...], bool]] = {"shared.weight": (("token_embedder", "embedding"), False)}
  mlp = ["wi_0", "wi_1", "wo"] if config.is_gated else ["wi", "wo"]
  stacks = (("encoder", config.num_encoder_layers,
             [("SelfAttention", "attention", "pre_attention_layer_norm")], "pre_mlp_layer_norm"),
            ("decoder", config.num_decoder_layers,
             [("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
              ("EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm")],
             "pre_mlp_layer_norm"))
  for stack, num_layers, attentions, mlp_norm in stacks:
    table[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        (stack, "relpos_bias", "rel_embedding"), True)
    table[f"{stack}.final_layer_norm.weight"] = (
        (stack, "encoder_norm" if stack == "encoder" else "decoder_norm", "scale"), False)
    for i in range(num_layers):
      prefix, layer = f"{stack}.block.{i}.layer", f"layers_{i}"
      for j, (hf_attention, ours, norm) in enumerate(attentions):
        table[f"{prefix}.{j}.layer_norm.weight"] = ((stack, layer, norm, "scale"), False)
        for short, long in _ATTENTION.items():
          table[f"{prefix}.{j}.{hf_attention}.{short}.weight"] = ((stack, layer, ours, long, "kernel"), True)
      j = len(attentions)
      table[f"{prefix}.{j}.layer_norm.weight"] = ((stack, layer, mlp_norm, "scale"), False)
      for name in mlp:
        table[f"{prefix}.{j}.DenseReluDense.{name}.weight"] = ((stack, layer, "mlp", name, "kernel"), True)
  if not config.logits_via_embedding:
    table["lm_head.weight"] = (("decoder", "logits_dense", "kernel"), True)
  return table


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file holding it (single file or sharded with an index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from None
    files = {}
    for name, shard in weight_map.items():
      shard_path = os.path.join(path, shard)
      if not os.path.isfile(shard_path):
        raise CheckpointError(f"{index}: tensor {name!r} is mapped to {shard}, which does not exist")
      files[name] = shard_path
    return files
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickles:
    raise CheckpointError(
        f"{path}: found {', '.join(pickles)} but no model.safetensors. Pickle checkpoints are not "
        "loaded (unpickling runs arbitrary code). Convert once with transformers installed: "
        "python -c \"from transformers import AutoModelForSeq2SeqLM as M; "
        f"M.from_pretrained('{path}').save_pretrained('OUT_DIR', safe_serialization=True)\"")
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_tensors(files: dict[str, str]) -> Iterator[tuple[str, str, np.ndarray]]:
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  for file, names in by_file.items():
    try:
      with safe_open(file, framework="numpy") as f:
        for name in names:
          yield name, file, f.get_tensor(name)
    except TypeError:
      # numpy has no bfloat16; read the raw little-endian bytes and view them with ml_dtypes.
      yield from _read_bfloat16_file(file, names)
    except Exception as e:  # safetensors raises its own error type for corrupt files
      if isinstance(e, CheckpointError):
        raise
      raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_bfloat16_file(file: str, names: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
  with open(file, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    data = f.read()
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
  for name in names:
    entry = header[name]
    if entry["dtype"] not in dtypes:
      raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry['dtype']}; expected a float type")
    start, end = entry["data_offsets"]
    yield name, file, np.frombuffer(data[start:end], dtypes[entry["dtype"]]).reshape(entry["shape"])


def read_hf_config(path: str) -> tuple[T5Config, str]:
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory not found")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path}: not found; a Hugging Face checkpoint needs its config.json")
  try:
    with open(config_path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
  try:
    return T5Config.from_hf_config(raw, source=config_path), raw.get("model_type", "t5")
  except ConfigError as e:
    raise CheckpointError(str(e)) from None


def load_hf_checkpoint(path: str, param_dtype=np.float32) -> HFCheckpoint:
  """Reads config.json, the safetensors weights and spiece.model from a HF T5/mT5 directory."""
  config, model_type = read_hf_config(path)
  table = hf_name_table(config)
  expected = param_shapes(config)
  params: dict = {}
  for name, file, tensor in _read_tensors(_tensor_files(path)):
    if name not in table:
      if name in _IGNORABLE or (name == "lm_head.weight" and config.logits_via_embedding):
        continue
      raise CheckpointError(f"{file}: unexpected tensor {name!r}, which this T5 config has no "
                            "parameter for (is config.json the right one?)")
    target, transpose = table[name]
    value = np.asarray(tensor.T if transpose else tensor).astype(param_dtype)
    want = _get(expected, target)
    if tuple(value.shape) != tuple(want):
      raise CheckpointError(
          f"{file}: tensor {name!r} -> parameter {'/'.join(target)}: expected shape {tuple(want)} "
          f"(after transposing HF's [out, in] layout: {transpose}), found {tuple(value.shape)}")
    _set(params, target, value)
  missing = [n for n, (target, _) in table.items() if not _has(params, target)]
  if missing and "shared.weight" in missing:
    missing = _fill_shared_from_copies(path, params, missing, param_dtype)
  if missing:
    raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  vocab = os.path.join(path, "spiece.model")
  return HFCheckpoint(config, params, vocab if os.path.isfile(vocab) else None, model_type)


def _has(tree: dict, path: tuple[str, ...]) -> bool:
  try:
    _get(tree, path)
    return True
  except KeyError:
    return False


def _fill_shared_from_copies(path: str, params: dict, missing: list[str], param_dtype) -> list[str]:
  """Some exports store the embedding only as `encoder.embed_tokens.weight`."""
  files = _tensor_files(path)
  for copy in _IGNORABLE:
    if copy in files:
      for _, _, tensor in _read_tensors({copy: files[copy]}):
        _set(params, ("token_embedder", "embedding"), np.asarray(tensor).astype(param_dtype))
      return [m for m in missing if m != "shared.weight"]
  return missing


def save_hf_checkpoint(params: dict, config: T5Config, path: str, *, model_type: str = "t5",
                       vocab_path: Optional[str] = None, max_shard_bytes: Optional[int] = None,
                       overwrite: bool = False) -> None:
  """Writes config.json, safetensors (sharded with an index past `max_shard_bytes`) and
  spiece.model. Built in a temporary sibling directory, then renamed into place."""
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise CheckpointError(f"{path}: directory exists and is not empty; pass overwrite=True to replace it")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tensors = {}
  for name, (target, transpose) in hf_name_table(config).items():
    value = np.asarray(_get(params, target), np.float32)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  tmp = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_hf_config(model_type), f, indent=2)
    _write_safetensors(tensors, tmp, max_shard_bytes)
    if vocab_path:
      shutil.copyfile(vocab_path, os.path.join(tmp, "spiece.model"))
    if os.path.isdir(path):
      old = tempfile.mkdtemp(prefix=".hf-replaced-", dir=parent)
      os.rename(path, os.path.join(old, "previous"))
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_safetensors(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: Optional[int]) -> None:
  total = sum(t.nbytes for t in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  weight_map: dict[str, Any] = {}
  for k, shard in enumerate(shards, start=1):
    filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
    weight_map.update({name: filename for name in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
