"""One trained expert on disk: `tensors.safetensors` plus `expert.json`.

`expert.json` holds the name, task or mixture, prompt, expert config, the fingerprint of the
backbone it was trained on, the training config, steps and final metrics. Loading an expert
onto a backbone with another fingerprint is an error unless forced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from elm_jax import tree_paths
from elm_jax.errors import UserInputError
from elm_jax.models.adapters import ExpertConfig

TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "expert.json"
FORMAT_VERSION = 1


class ExpertFileError(UserInputError):
  """A missing or malformed expert directory, or one trained on another backbone."""


def backbone_fingerprint(params: dict) -> str:
  """blake2b over every parameter's path, shape, dtype and bytes (order-independent of dicts)."""
  digest = hashlib.blake2b(digest_size=16)
  for path, value in sorted((tree_paths.join(p), v) for p, v in tree_paths.flatten(params).items()):
    array = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{path}|{array.shape}|{array.dtype}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass
class ExpertMetadata:
  name: str
  task: str
  expert_config: dict
  backbone_fingerprint: str
  prompt: Optional[str] = None
  training_config: dict = dataclasses.field(default_factory=dict)
  steps: int = 0
  metrics: dict = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  @classmethod
  def from_json(cls, raw: dict, source: str) -> "ExpertMetadata":
    for field, kind in (("name", str), ("task", str), ("expert_config", dict),
                        ("backbone_fingerprint", str)):
      if not isinstance(raw.get(field), kind):
        raise ExpertFileError(f"{source}: field {field!r} must be a {kind.__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})


def save_expert(directory: str, params: dict, metadata: ExpertMetadata, overwrite: bool = False) -> None:
  """Writes the expert atomically (temporary sibling directory, then rename)."""
  if os.path.exists(directory) and not overwrite:
    raise ExpertFileError(f"{directory}: already exists; experts are never overwritten unless asked")
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".expert-", dir=parent)
  try:
    tensors = {tree_paths.join(p): np.ascontiguousarray(np.asarray(v))
               for p, v in tree_paths.flatten(params).items()}
    save_file(tensors, os.path.join(tmp, TENSORS_FILE))
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(dataclasses.asdict(metadata), f, indent=1, sort_keys=True)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_metadata(directory: str) -> ExpertMetadata:
  """The expert's metadata alone (validated), without reading its tensors."""
  from etils import epath
  meta_path = epath.Path(directory) / METADATA_FILE
  if not meta_path.is_file():
    raise ExpertFileError(f"{meta_path}: not found; an expert directory holds {METADATA_FILE} and {TENSORS_FILE}")
  try:
    metadata = ExpertMetadata.from_json(json.loads(meta_path.read_text()), str(meta_path))
  except json.JSONDecodeError as e:
    raise ExpertFileError(f"{meta_path}: not valid JSON ({e})") from None
  ExpertConfig(**metadata.expert_config)  # validates the stored config
  return metadata


def load_expert(directory: str, backbone_fingerprint: Optional[str] = None,
                 force: bool = False) -> tuple[dict, ExpertMetadata]:
  """(expert parameter tree, metadata); checks the backbone fingerprint unless `force`.
  `directory` may be any path etils.epath reads (local, gs://, ...)."""
  from etils import epath
  from safetensors.numpy import load as load_bytes
  root = epath.Path(directory)
  meta_path, tensors_path = root / METADATA_FILE, root / TENSORS_FILE
  for path in (meta_path, tensors_path):
    if not path.is_file():
      raise ExpertFileError(f"{path}: not found; an expert directory holds {METADATA_FILE} and {TENSORS_FILE}")
  metadata = load_metadata(directory)
  if backbone_fingerprint is not None and metadata.backbone_fingerprint != backbone_fingerprint and not force:
    raise ExpertFileError(
        f"{meta_path}: expert {metadata.name!r} was trained on backbone "
        f"{metadata.backbone_fingerprint}, not on this one ({backbone_fingerprint}); pass force=True "
        "(--force) to load it anyway")
  try:
    params = tree_paths.unflatten({tree_paths.split(k): v for k, v in load_bytes(tensors_path.read_bytes()).items()})
  except Exception as e:  # safetensors raises its own error type for damaged files
    raise ExpertFileError(f"{tensors_path}: not a readable safetensors file ({e})") from None
  return params, metadata
