"""What an Expert Library records about its experts, checked as it is read: `manifest.json`
(a format version, the backbone, and one entry per expert: its directory, its files' sha256
and sizes, its keys file's and, once trained, its PHATGOOSE gates file's, `gates_file`) and
the entry a removal's record carries (`.trash/<name>.<id>/removal.json`).

The retrieval keys kept beside an expert (`retrieval/keys/<name>.jsonl`: training instances,
each `{inputs, answer_choices?}`) are checked the same way (`check_keys`), when they are added and
when they are read.

A damaged record is named, not tripped over: every entry's fields are checked; a key given
twice in one JSON object is refused (a reader would silently keep the last: a second expert
under one name); and paths are unique per entry: two entries naming one directory, or two
names sharing one keys file, are refused (removing one would delete the other's files).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from etils import epath

from elm_jax import files
from elm_jax.library.paths import EXPERT_FILES, KEYS_DIR, LibraryError, safe_name

FORMAT_VERSION = 1


def empty_manifest() -> dict[str, Any]:
  """The manifest of a library that holds no expert yet."""
  return {"format_version": FORMAT_VERSION, "backbone_fingerprint": None, "backbone_checkpoint": None,
          "experts": {}}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
  return json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()


def unique_keys(path: epath.Path):
  """A `json.loads` object_pairs_hook that refuses a key given twice in one object (the reader
  would silently keep the last: a second expert under one name, say)."""
  def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
      if key in out:
        raise LibraryError(f"{path}: the key {key!r} appears twice in one object (an expert name or a "
                           "field given twice; only the last would be read); keep one of them")
      out[key] = value
    return out
  return hook


def read_json(path: epath.Path) -> Any:
  """The JSON value in `path`, no key given twice in one object; an error naming the file when
  it cannot be read or parsed."""
  try:
    return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=unique_keys(path))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise LibraryError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise LibraryError(f"{path}: cannot be read ({e.strerror or e})") from None


def check_manifest(manifest: Any, path: epath.Path) -> dict[str, Any]:
  """`manifest` (read from `path`) with every entry's fields checked, no two entries sharing a
  directory or a keys file, and this version's format."""
  if not isinstance(manifest, dict) or not isinstance(manifest.get("experts"), dict):
    raise LibraryError(f"{path}: field 'experts' must be an object of expert name -> entry")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise LibraryError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}; "
                       f"this version of elm_jax reads {FORMAT_VERSION}")
  for name, entry in manifest["experts"].items():
    check_entry(name, entry, str(path))
  check_unique_paths(manifest["experts"], str(path))
  return manifest


def check_entry(name: Any, entry: Any, where: str) -> None:
  """Refuses a manifest entry whose fields are missing or of the wrong type."""
  field = f"{where}: experts[{name!r}]"
  if not isinstance(entry, dict):
    raise LibraryError(f"{field}: expected an object, got {type(entry).__name__}")
  if not isinstance(entry.get("directory"), str):
    raise LibraryError(f"{field}.directory: expected a path such as 'experts/NAME', got "
                       f"{entry.get('directory')!r}")
  recorded = entry.get("files")
  if not isinstance(recorded, dict) or not recorded:
    raise LibraryError(f"{field}.files: expected an object of file name -> {{sha256, bytes}}, got "
                       f"{recorded!r}")
  for file, digest in recorded.items():
    if file not in EXPERT_FILES:
      raise LibraryError(f"{field}.files: unknown file {file!r}; expected {list(EXPERT_FILES)}")
    if not (isinstance(digest, dict) and isinstance(digest.get("sha256"), str)
            and isinstance(digest.get("bytes"), int)):
      raise LibraryError(f"{field}.files[{file!r}]: expected {{\"sha256\": hex string, "
                         f"\"bytes\": integer}}, got {digest!r}")
  for key in ("keys_file", "gates_file"):
    recorded_file = entry.get(key)
    if recorded_file is not None and not (isinstance(recorded_file, dict)
                                          and isinstance(recorded_file.get("sha256"), str)
                                          and isinstance(recorded_file.get("bytes"), int)):
      raise LibraryError(f"{field}.{key}: expected {{\"sha256\", \"bytes\"}}, got {recorded_file!r}")


def check_unique_paths(experts: dict[str, Any], where: str) -> None:
  """Refuses two entries naming one directory, or two names whose keys (and embedding) files
  are one file (`a/b` and `a_b`): removing one would delete the other's files."""
  directories: dict[str, str] = {}
  keys_files: dict[str, str] = {}
  for name in sorted(experts):
    try:
      keys_file = f"{KEYS_DIR}/{safe_name(name)}.jsonl"
    except LibraryError as e:
      raise LibraryError(f"{where}: experts[{name!r}]: {e}") from None
    directory = experts[name]["directory"]
    for table, path, what in ((directories, directory, f"name the directory {directory!r}"),
                              (keys_files, keys_file, f"map to the keys file {keys_file}")):
      other = table.setdefault(path, name)
      if other != name:
        raise LibraryError(f"{where}: experts[{other!r}] and experts[{name!r}] both {what}; a "
                           "directory or keys file belongs to one entry (removing one would delete "
                           "the other's files): edit the manifest")


def file_digests(directory: epath.Path) -> dict[str, dict[str, Any]]:
  """The `files` field of an entry for the expert in `directory`: {file: {sha256, bytes}}."""
  out = {}
  for file in EXPERT_FILES:
    path = directory / file
    if not path.is_file():
      raise LibraryError(f"{path}: not found; an expert directory holds {' and '.join(EXPERT_FILES)}")
    digest, size = files.digest_file(path)
    out[file] = {"sha256": digest, "bytes": size}
  return out


def check_keys(rows: Sequence[Any], source: str) -> list[dict[str, Any]]:
  """Retrieval keys checked: each a JSON object with a string `inputs` and, when present, a list
  of strings `answer_choices`. `rows` holds objects or (line number, object) pairs, whose
  numbers the errors name as `source:line`."""
  out = []
  for i, row in enumerate(rows):
    number, key = row if isinstance(row, tuple) else (i + 1, row)
    where = f"{source}:{number}" if isinstance(row, tuple) else f"{source}: key {i}"
    if not isinstance(key, dict):
      raise LibraryError(f"{where}: expected a JSON object {{inputs, answer_choices?}}, got "
                         f"{type(key).__name__}")
    if not isinstance(key.get("inputs"), str):
      raise LibraryError(f"{where}: field 'inputs' must be a string, got {type(key.get('inputs')).__name__}")
    choices = key.get("answer_choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
      raise LibraryError(f"{where}: field 'answer_choices' must be a list of strings, got {choices!r}")
    out.append(key)
  return out
