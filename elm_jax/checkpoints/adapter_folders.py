"""The folders PEFT and AdapterHub's `adapters` package share experts in, as both formats have
them: `adapter_config.json` beside a safetensors file of tensors named after Hugging Face's T5
modules. Reading (JSON, safetensors widened to float32, pickle files refused), checking a file's
tensor list, refusing a configuration field with its reason, and writing a folder atomically;
`hf_modules` derives the module names from the one name table of `hf.py`. The formats
themselves are `peft_format` and `adapters_format`; `interchange` converts whole experts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save as save_safetensors

from elm_jax import files
from elm_jax.checkpoints import hf
from elm_jax.checkpoints.expert_files import ExpertFileError
from elm_jax.models.t5_config import T5Config

CONFIG_FILE = "adapter_config.json"  # both formats
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}


class InterchangeError(ExpertFileError):
  """A PEFT or AdapterHub folder that elm_jax cannot read as an expert, or an expert that such a
  folder cannot hold."""


@dataclasses.dataclass(frozen=True)
class ImportedExpert:
  """What a reader made of a folder: an expert config (a dict of `ExpertConfig` fields), its
  tensors ({'encoder/layers_0/attention/query/lora_a': float32 array}) and the folder's own
  configuration (the parsed `adapter_config.json`)."""
  expert_config: dict
  tensors: dict
  original_config: dict


# ------------------------------------------------------------------------ Hugging Face names
def hf_modules(config: T5Config) -> dict[tuple[str, ...], str]:
  """Our module path -> Hugging Face T5 module name, for every projection and layer norm of
  `config`: ('encoder', 'layers_0', 'attention', 'query') -> 'encoder.block.0.layer.0.SelfAttention.q',
  ('decoder', 'layers_1', 'pre_mlp_layer_norm') -> 'decoder.block.1.layer.2.layer_norm',
  ('encoder', 'encoder_norm') -> 'encoder.final_layer_norm' (from `hf.hf_name_table`)."""
  out = {}
  for name, entry in hf.hf_name_table(config).items():
    if entry.path[-1] in ("kernel", "scale") and len(entry.path) > 2 and name.endswith(".weight"):
      out[entry.path[:-1]] = name[:-len(".weight")]
  return out


# ------------------------------------------------------------------------------- reading
def read_json_object(path: str) -> dict:
  """The JSON object in `path`; an error naming the file otherwise."""
  return files.read_json_object(path, InterchangeError)


def weights_file(directory: str, names: tuple[str, ...], convert: str) -> str:
  """The first of `names` (safetensors files) in `directory`. Without one, an error that names
  a pickle file found instead (never unpickled: that runs arbitrary code) and `convert`, the
  line that rewrites it as safetensors where its library is installed."""
  for name in names:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  pickles = sorted(n for n in os.listdir(directory) if n.endswith(_PICKLE_SUFFIXES))
  if pickles:
    raise InterchangeError(f"{directory}: found {', '.join(pickles)} but no {' or '.join(names)}. Pickle "
                           "files are not loaded (unpickling runs arbitrary code). Convert once where "
                           f"that library is installed: {convert}")
  raise InterchangeError(f"{directory}: {' or '.join(names)} not found")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as float32 (F32, F16 and BF16 are widened exactly; the
  header is parsed here because safetensors' numpy backend rejects BF16)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InterchangeError(f"{path}: cannot be read ({e.strerror or e})") from None
  try:
    if len(data) < 8:
      raise ValueError(f"{len(data)} bytes")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    if not isinstance(header, dict):
      raise ValueError(f"the header is a {type(header).__name__}")
  except (ValueError, UnicodeDecodeError) as e:
    raise InterchangeError(f"{path}: not a readable safetensors file ({e})") from None
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      kind, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise InterchangeError(f"{path}: tensor {name!r}: expected a header entry {{dtype, shape, "
                             f"data_offsets}}, found {entry!r}") from None
    dtype = _FLOAT_DTYPES.get(kind)
    if dtype is None:
      raise InterchangeError(f"{path}: tensor {name!r} has dtype {kind!r}; expected one of "
                             f"{', '.join(_FLOAT_DTYPES)}")
    if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or 8 + size + end > len(data):
      raise InterchangeError(f"{path}: tensor {name!r}: its byte range does not hold shape {shape}")
    array = np.frombuffer(data, dtype, count=(end - start) // dtype.itemsize, offset=8 + size + start)
    out[name] = array.reshape(shape).astype(np.float32)
  return out


def json_text(value: Any) -> str:
  """`value` as adapter_config.json writes it (true, null, 'none', [])."""
  return json.dumps(value).replace('"', "'")


def is_neutral(value: Any) -> bool:
  """Whether a configuration field holds nothing: null, false, or an empty list, object or string."""
  return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def refuse(source: str, field: str, found: Any, expected: str, reason: str = "") -> InterchangeError:
  """The error for a configuration field elm_jax cannot express."""
  because = f": {reason}" if reason else ""
  return InterchangeError(f"{source}: field {field!r} is {json_text(found)}; expected {expected}{because}")


def match_tensors(source: str, found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                  hint: str) -> None:
  """Refuses a file whose tensor names or shapes are not exactly `expected` ({name: shape}),
  naming the first unexpected, missing or mis-shaped tensor; `hint` names the expert the
  configuration describes, which decides the list."""
  for name in sorted(found):
    if name not in expected:
      raise InterchangeError(f"{source}: unexpected tensor {name!r} of shape {found[name].shape}: not part "
                             f"of {hint}")
  missing = [name for name in expected if name not in found]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise InterchangeError(f"{source}: missing tensor {missing[0]!r} (expected shape "
                           f"{expected[missing[0]]}){more}: part of {hint}")
  for name, shape in expected.items():
    if found[name].shape != tuple(shape):
      raise InterchangeError(f"{source}: tensor {name!r} has shape {found[name].shape}; expected "
                             f"{tuple(shape)} ({hint})")


def write_folder(directory: str, config: dict, tensors: Mapping[str, np.ndarray], weights: str) -> None:
  """`directory`/adapter_config.json and `directory`/`weights` (safetensors, format metadata
  'pt' as PyTorch writers put it), written atomically; an existing `directory` is refused."""
  data = save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})
  with files.atomic_directory(directory) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True, allow_nan=False)
      f.write("\n")
    with open(os.path.join(tmp, weights), "wb") as f:
      f.write(data)
