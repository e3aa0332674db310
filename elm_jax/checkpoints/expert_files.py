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
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save_file

from elm_jax import files, tree_paths
from elm_jax.errors import UserInputError
from elm_jax.models.adapters import ExpertConfig

TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "expert.json"
FORMAT_VERSION = 1


MAX_NAME_BYTES = 200  # leaves room for suffixes (.jsonl, staging tags) under the usual 255


class ExpertFileError(UserInputError):
  """A missing or malformed expert directory, or one trained on another backbone."""


def directory_name(name: Any, field: str = "expert name") -> str:
  """The one directory (and file) name of an expert name, as training, the library and merging
  write it: every character other than letters, digits and `-_.@` becomes `_` (`a/b` -> `a_b`).
  Refused: a non-string or empty name, one whose directory name would start with `.` (`.`,
  `..`, hidden names; `.` prefixes mark files being written) or is longer than MAX_NAME_BYTES."""
  if not isinstance(name, str) or not name.strip():
    raise ExpertFileError(f"{field}: expected a non-empty name, got {name!r}")
  mapped = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
  if mapped.startswith("."):
    raise ExpertFileError(f"{field}: {name!r} is not a usable expert name (its directory name "
                          f"{mapped!r} would start with '.'); expected a name starting with a "
                          "letter, digit, '_', '-' or '@'")
  if len(mapped.encode()) > MAX_NAME_BYTES:
    raise ExpertFileError(f"{field}: {name[:40]!r}... is {len(mapped.encode())} bytes long; "
                          f"expected at most {MAX_NAME_BYTES}")
  return mapped


def directory_names(names: Sequence[Any], field: str = "expert names") -> list[str]:
  """`directory_name` of each name, refusing two names that map to the same directory
  (`a/b` and `a_b`): one expert would silently replace the other."""
  seen: dict[str, str] = {}
  out = []
  for name in names:
    mapped = directory_name(name, field)
    if mapped in seen:
      raise ExpertFileError(f"{field}: {seen[mapped]!r} and {name!r} both map to the directory "
                            f"name {mapped!r}; give them names that differ in letters or digits")
    seen[mapped] = name
    out.append(mapped)
  return out


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
  """Writes the expert atomically (a temporary sibling directory, then a rename). With
  `overwrite`, an existing expert directory is replaced; a directory holding anything else than
  an expert's two files is never replaced (nothing we did not write is deleted)."""
  if os.path.lexists(directory):
    if not overwrite:
      raise ExpertFileError(f"{directory}: already exists; experts are never overwritten unless asked")
    if not os.path.isdir(directory) or not set(os.listdir(directory)) <= {TENSORS_FILE, METADATA_FILE}:
      raise ExpertFileError(f"{directory}: exists and is not an expert directory (it holds more than "
                            f"{TENSORS_FILE} and {METADATA_FILE}); not replacing it")
  tensors = {tree_paths.join(p): np.ascontiguousarray(np.asarray(v))
             for p, v in tree_paths.flatten(params).items()}
  with files.atomic_directory(directory, replace=overwrite) as tmp:
    save_file(tensors, os.path.join(tmp, TENSORS_FILE))
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(dataclasses.asdict(metadata), f, indent=1, sort_keys=True, allow_nan=False)


def _recorded(recorded: Optional[Mapping[str, Any]], file: str) -> tuple[Optional[str], Optional[int]]:
  entry = (recorded or {}).get(file) or {}
  return entry.get("sha256"), entry.get("bytes")


def _parse_metadata(data: bytes, source: str) -> ExpertMetadata:
  try:
    raw = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExpertFileError(f"{source}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ExpertFileError(f"{source}: expected a JSON object, got {type(raw).__name__}")
  metadata = ExpertMetadata.from_json(raw, source)
  try:
    ExpertConfig(**metadata.expert_config)  # validates the stored config
  except TypeError as e:
    raise ExpertFileError(f"{source}: field 'expert_config': {e}") from None
  return metadata


def load_metadata(directory: str, *, recorded: Optional[Mapping[str, Any]] = None,
                  what: str = "expert", check_integrity: bool = True) -> ExpertMetadata:
  """The expert's metadata alone (validated), without reading its tensors; checked against
  `recorded` ({file: {sha256, bytes}}, a library manifest's) when given."""
  meta_path = epath.Path(directory) / METADATA_FILE
  if not meta_path.is_file():
    raise ExpertFileError(f"{meta_path}: not found; an expert directory holds {METADATA_FILE} and {TENSORS_FILE}")
  sha, size = _recorded(recorded, METADATA_FILE)
  data = files.read_verified(meta_path, sha, size, what, check=check_integrity)
  return _parse_metadata(data, str(meta_path))


def load_expert(directory: str, backbone_fingerprint: Optional[str] = None,
                force: bool = False, *, recorded: Optional[Mapping[str, Any]] = None,
                what: str = "expert", check_integrity: bool = True) -> tuple[dict, ExpertMetadata]:
  """(expert parameter tree, metadata); checks the backbone fingerprint unless `force`.
  `directory` may be any path etils.epath reads (local, gs://, ...). With `recorded` ({file:
  {sha256, bytes}}, from a library manifest) each file is checked against its digest as it is
  read, before it is parsed (`files.read_verified`), unless `check_integrity` is False."""
  root = epath.Path(directory)
  meta_path, tensors_path = root / METADATA_FILE, root / TENSORS_FILE
  for path in (meta_path, tensors_path):
    if not path.is_file():
      raise ExpertFileError(f"{path}: not found; an expert directory holds {METADATA_FILE} and {TENSORS_FILE}")
  metadata = load_metadata(directory, recorded=recorded, what=what, check_integrity=check_integrity)
  if backbone_fingerprint is not None and metadata.backbone_fingerprint != backbone_fingerprint and not force:
    raise ExpertFileError(
        f"{meta_path}: expert {metadata.name!r} was trained on backbone "
        f"{metadata.backbone_fingerprint}, not on this one ({backbone_fingerprint}); pass force=True "
        "(--force) to load it anyway")
  sha, size = _recorded(recorded, TENSORS_FILE)
  data = files.read_verified(tensors_path, sha, size, what, check=check_integrity)
  try:
    tensors = load_safetensors_bytes(data)
  except Exception as e:  # safetensors raises its own error type for damaged files
    raise ExpertFileError(f"{tensors_path}: not a readable safetensors file ({e})") from None
  return tree_paths.unflatten({tree_paths.split(k): v for k, v in tensors.items()}), metadata
