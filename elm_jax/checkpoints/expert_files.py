"""One trained expert on disk: `tensors.safetensors` plus `expert.json`.

`expert.json` holds the name, task or mixture, prompt, expert config, the fingerprint of the
backbone it was trained on, the training config (with the backbone's `T5Config` under
`training_config.model`), steps and final metrics. Loading an expert onto a backbone with
another fingerprint is an error unless forced.

Every load checks the tensors against the expert's parameter list (`parameter_list`: what the
model builds for its kind on the recorded backbone config, exactly those names, shapes and
dtypes) and refuses NaN and Inf, naming the tensor (`tensor_problems`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from etils import epath
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save_file

from elm_jax import files, tree_paths
from elm_jax.errors import UserInputError
from elm_jax.models.experts import ExpertConfig, ExpertSet
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config

TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "expert.json"
FORMAT_VERSION = 1
MAX_PROBLEMS_LISTED = 10  # per expert file, in `library verify`


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
  check_tensors(tensors, metadata, str(tensors_path), recorded_model_config(metadata, str(meta_path)))
  return tree_paths.unflatten({tree_paths.split(k): v for k, v in tensors.items()}), metadata


_checked: dict[tuple, ExpertMetadata] = {}  # identities of expert files checked by this process


def _identity(directory: str) -> Optional[tuple]:
  """(real path, size, modification time, inode) of a local expert's two files, else None."""
  if "://" in os.fspath(directory):
    return None
  try:
    stats = [(os.path.realpath(p), s.st_size, s.st_mtime_ns, s.st_ino)
             for p in (os.path.join(directory, f) for f in (METADATA_FILE, TENSORS_FILE))
             for s in (os.stat(p),)]
  except OSError:
    return None  # `load_expert` names what is missing
  return tuple(stats)


def check_expert(directory: str) -> ExpertMetadata:
  """The metadata of the expert at `directory`, once its files have passed `load_expert`'s
  checks (parameter list, finite values); the tensors are not kept. A local expert whose files
  this process checked before (same paths, sizes, modification times) is not checked again, so
  `library add` checks every expert before it creates the library and loads each one once."""
  key = _identity(directory)
  if key is None or key not in _checked:
    metadata = load_expert(directory)[1]
    if key is None:
      return metadata
    _checked[key] = metadata
  return dataclasses.replace(_checked[key])


# ---------------------------------------------------------------------------- parameter list
def recorded_model_config(metadata: ExpertMetadata, source: str) -> Optional[T5Config]:
  """The backbone config the expert was trained on (`training_config.model`, as training
  records it), or None when the metadata records none. Fields this version does not know are
  ignored (they cannot change the parameters it builds)."""
  raw = metadata.training_config.get("model") if isinstance(metadata.training_config, dict) else None
  if raw is None:
    return None
  if not isinstance(raw, dict):
    raise ExpertFileError(f"{source}: field 'training_config.model': expected an object (the "
                          f"backbone's T5Config), got {type(raw).__name__}")
  known = {f.name for f in dataclasses.fields(T5Config)}
  try:
    return T5Config(**{k: v for k, v in raw.items() if k in known})
  except (TypeError, UserInputError) as e:
    raise ExpertFileError(f"{source}: field 'training_config.model': {e}") from None


def parameter_list(expert_config: ExpertConfig | ExpertSet, model_config: T5Config,
                   source: str) -> dict[str, jax.ShapeDtypeStruct]:
  """The exact tensors ({name: shape and dtype}) an expert of `expert_config` (or every expert
  of a stack of several kinds, an `ExpertSet`) on a backbone of `model_config` holds: the
  model's `expert_shapes` (traced: no arrays are made; kept for the last 32 pairs of configs).
  A config the model cannot build is named as `source`'s."""
  try:
    return dict(_parameter_list(model_config, expert_config))
  except (TypeError, ValueError) as e:
    raise ExpertFileError(f"{source}: fields 'expert_config' and 'training_config.model' describe no "
                          f"model that can be built ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=32)
def _parameter_list(model_config: T5Config, expert_config: ExpertConfig | ExpertSet) -> tuple:
  return tuple(EncoderDecoderModel.build(model_config, expert_config).expert_shapes().items())


def _examples(names: Sequence[str], count: int = 3) -> str:
  shown = ", ".join(repr(n) for n in list(names)[:count])
  return shown + (", ..." if len(names) > count else "")


def layout_problems(layout: Mapping[str, tuple[tuple[int, ...], Any]], expert_config: ExpertConfig | ExpertSet,
                    expected: Optional[Mapping[str, jax.ShapeDtypeStruct]]) -> list[str]:
  """What keeps tensors of `layout` ({name: (shape, dtype)}) from being an expert of
  `expert_config` whose parameter list is `expected` (`parameter_list`): names not in it, names
  missing from it, other shapes or dtypes. Without `expected` (an expert that records no
  backbone config) only the names are checked, against what the kind trains (`trains`)."""
  kind = expert_config.label
  of_kind = f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind!r} expert"
  if expected is None:
    return [f"tensor {name!r} is not a parameter of {of_kind} (expected only the modules its kind "
            "adds and, with train_layer_norms, the layer-norm scales)"
            for name in sorted(layout) if not expert_config.trains(name)]
  names = sorted(expected)
  problems = [f"tensor {name!r} is not a parameter of {of_kind} (expected only its {len(names)} "
              f"parameters: {_examples(names)})" for name in sorted(set(layout) - set(expected))]
  problems += [f"tensor {name!r} is missing (expected {tuple(expected[name].shape)} "
               f"{np.dtype(expected[name].dtype).name}, one of the {len(names)} parameters of {of_kind} "
               "on this backbone)"
               for name in sorted(set(expected) - set(layout))]
  for name in sorted(set(expected) & set(layout)):
    shape, dtype = layout[name]
    want = expected[name]
    if tuple(shape) != tuple(want.shape):
      problems.append(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(want.shape)}")
    elif np.dtype(dtype) != np.dtype(want.dtype):
      problems.append(f"tensor {name!r} has dtype {np.dtype(dtype).name}, expected "
                      f"{np.dtype(want.dtype).name}")
  return problems


def nonfinite_problems(tensors: Mapping[str, Any]) -> list[str]:
  """One line per tensor holding NaN or Inf, with the counts ("tensor 'x' holds 3 NaN and 1 Inf
  values"): one pass of `np.isfinite` per tensor, counted only where it finds one."""
  problems = []
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    try:
      finite = np.isfinite(array)
    except TypeError:  # not a number type; `layout_problems` names its dtype
      continue
    if finite.all():
      continue
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    problems.append(f"tensor {name!r} holds {counts} value{'s' if nan + inf > 1 else ''}")
  return problems


def tensor_problems(tensors: Mapping[str, Any], metadata: ExpertMetadata, source: str,
                    model_config: Optional[T5Config] = None) -> list[str]:
  """Every problem of `tensors` ({'encoder/...': array}) as the tensors of the expert that
  `metadata` describes, on `model_config` (default: the backbone config it records):
  `layout_problems`, then `nonfinite_problems`, each line starting with `source`."""
  expert_config = ExpertConfig(**metadata.expert_config)
  model_config = model_config or recorded_model_config(metadata, source)
  expected = parameter_list(expert_config, model_config, source) if model_config is not None else None
  layout = {name: (np.shape(v), np.asarray(v).dtype) for name, v in tensors.items()}
  return [f"{source}: {problem}"
          for problem in layout_problems(layout, expert_config, expected) + nonfinite_problems(tensors)]


def check_tensors(tensors: Mapping[str, Any], metadata: ExpertMetadata, source: str,
                  model_config: Optional[T5Config] = None) -> None:
  """Raises `ExpertFileError` with the first of `tensor_problems` (and how many more)."""
  problems = tensor_problems(tensors, metadata, source, model_config)
  if problems:
    more = f" (and {len(problems) - 1} more problem(s) with its tensors)" if len(problems) > 1 else ""
    raise ExpertFileError(problems[0] + more)


def expert_problems(directory: str) -> list[str]:
  """What `load_expert` would refuse in the expert at `directory`, every problem listed (at most
  MAX_PROBLEMS_LISTED, then their count): for `library verify`, once the files' hashes match."""
  try:
    metadata = load_metadata(directory, check_integrity=False)
    tensors_path = epath.Path(directory) / TENSORS_FILE
    try:
      tensors = load_safetensors_bytes(tensors_path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for damaged files
      raise ExpertFileError(f"{tensors_path}: not a readable safetensors file ({e})") from None
    model_config = recorded_model_config(metadata, str(epath.Path(directory) / METADATA_FILE))
    problems = tensor_problems(tensors, metadata, str(tensors_path), model_config)
  except ExpertFileError as e:
    return [str(e)]
  if len(problems) > MAX_PROBLEMS_LISTED:
    problems = problems[:MAX_PROBLEMS_LISTED - 1] + [
        f"{tensors_path}: {len(problems) - MAX_PROBLEMS_LISTED + 1} more problem(s) like these"]
  return problems
