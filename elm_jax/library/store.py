"""The Expert Library: a directory of expert directories, a manifest and an append-only history.

    <library>/manifest.json            names, metadata, content hashes, the backbone fingerprint
    <library>/history.jsonl            one line per add / remove, never rewritten
    <library>/experts/<name>/          tensors.safetensors + expert.json, as the trainer wrote them
    <library>/retrieval/keys/<name>.jsonl            training instances used as retrieval keys
    <library>/retrieval/embeddings/<embedder>/<format>/<name>.npy   their embeddings (a cache)

`<name>` is `expert_files.directory_name(name)`; two experts whose names map to one directory
name are refused. The library may live on any path `etils.epath` handles (a local directory or
a cloud bucket), and may come from elsewhere: every path read from its manifest must stay inside
it (`files.inside`), and every expert file is checked against the manifest's sha256 as it is
loaded (`files.read_verified`). Every file is written to a temporary name and renamed into
place, so a reader never sees half a file. Writers take an exclusive lock (`<library>/.lock`,
`fcntl.flock`) around each read-modify-write of the manifest; on object stores, where no such
lock exists, writes are atomic per file but concurrent writers must be kept apart by the caller.
Adding an expert writes only new files: existing experts, keys and embeddings are never touched.
An add interrupted at any point can be run again: experts already there with the same content
are skipped, and what the interrupted add left behind is reported by `verify` and cleared by
the next add.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
import uuid
from typing import Any, Iterator, Optional, Sequence

from etils import epath

from elm_jax import files
from elm_jax.checkpoints import expert_files
from elm_jax.errors import UserInputError
from elm_jax.expert_stack import ExpertStack, ExpertStackError

MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
FORMAT_VERSION = 1
EXPERTS_DIR = "experts"
KEYS_DIR = "retrieval/keys"
_EXPERT_FILES = (expert_files.TENSORS_FILE, expert_files.METADATA_FILE)
# A staged expert directory: experts/.<directory name>.<host>.<pid>.<hex>.tmp
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[\w-]*)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp$")


class LibraryError(UserInputError):
  """A malformed library, an unknown or duplicate expert, or files that fail verification."""


def safe_name(name: str) -> str:
  """The file-system name of an expert (`expert_files.directory_name`)."""
  try:
    return expert_files.directory_name(name)
  except expert_files.ExpertFileError as e:
    raise LibraryError(str(e)) from None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
  return re.sub(r"[^\w-]", "-", socket.gethostname())[:40]


def _check_entry(name: Any, entry: Any, where: str) -> None:
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
    if file not in _EXPERT_FILES:
      raise LibraryError(f"{field}.files: unknown file {file!r}; expected {list(_EXPERT_FILES)}")
    if not (isinstance(digest, dict) and isinstance(digest.get("sha256"), str)
            and isinstance(digest.get("bytes"), int)):
      raise LibraryError(f"{field}.files[{file!r}]: expected {{\"sha256\": hex string, "
                         f"\"bytes\": integer}}, got {digest!r}")
  keys_file = entry.get("keys_file")
  if keys_file is not None and not (isinstance(keys_file, dict) and isinstance(keys_file.get("sha256"), str)
                                    and isinstance(keys_file.get("bytes"), int)):
    raise LibraryError(f"{field}.keys_file: expected {{\"sha256\", \"bytes\"}}, got {keys_file!r}")


class ExpertLibrary:
  """An expert store rooted at `root` (created by `ExpertLibrary.create` or on first `add`).

  `check_integrity=False` loads expert files without comparing them with the manifest's sha256
  (each load warns); everything else is unchanged."""

  def __init__(self, root: str | os.PathLike, create: bool = False, check_integrity: bool = True):
    self.root = epath.Path(root)
    self.check_integrity = check_integrity
    if self.root.exists() and not self.root.is_dir():
      raise LibraryError(f"{self.root}: is a file, not an expert library directory")
    if not (self.root / MANIFEST).exists():
      if not create:
        raise LibraryError(f"{self.root / MANIFEST}: not found; {self.root} is not an expert library "
                           "(create one with `elm-jax library add --library=DIR EXPERT_DIR`)")
      self.root.mkdir(parents=True, exist_ok=True)
      with self._lock():
        if not (self.root / MANIFEST).exists():
          self._write_manifest({"format_version": FORMAT_VERSION, "backbone_fingerprint": None,
                                "backbone_checkpoint": None, "experts": {}})

  # ------------------------------------------------------------------ manifest and lock
  @contextlib.contextmanager
  def _lock(self) -> Iterator[None]:
    if not files.is_local(self.root):
      yield
      return
    with open(os.fspath(self.root / ".lock"), "a") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  def manifest(self) -> dict[str, Any]:
    """The manifest, every entry's fields checked (a damaged entry is named, not tripped over)."""
    path = self.root / MANIFEST
    try:
      manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise LibraryError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
      raise LibraryError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("experts"), dict):
      raise LibraryError(f"{path}: field 'experts' must be an object of expert name -> entry")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise LibraryError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}; "
                         f"this version of elm_jax reads {FORMAT_VERSION}")
    for name, entry in manifest["experts"].items():
      _check_entry(name, entry, str(path))
    return manifest

  def _write_manifest(self, manifest: dict[str, Any]) -> None:
    files.write_atomically(self.root / MANIFEST,
                     json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode())

  def _append_history(self, record: dict[str, Any]) -> None:
    with (self.root / HISTORY).open("a") as f:
      f.write(json.dumps({"time": _now(), **record}, sort_keys=True) + "\n")

  def history(self) -> list[dict[str, Any]]:
    path = self.root / HISTORY
    if not path.exists():
      return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise LibraryError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return out

  # ------------------------------------------------------------------ queries
  def names(self) -> list[str]:
    return sorted(self.manifest()["experts"])

  def entry(self, name: str) -> dict[str, Any]:
    experts = self.manifest()["experts"]
    if name not in experts:
      raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}; the library holds "
                         f"{len(experts)} expert(s): {', '.join(sorted(experts)[:10])}"
                         f"{' ...' if len(experts) > 10 else ''}")
    return experts[name]

  def _directory(self, name: str, entry: dict[str, Any]) -> epath.Path:
    """The expert's directory: `experts/<one name>` inside the library, or an error."""
    what = f"{self.root / MANIFEST}: experts[{name!r}].directory"
    directory = entry["directory"]
    if not directory.startswith(EXPERTS_DIR + "/") or "/" in directory[len(EXPERTS_DIR) + 1:]:
      raise LibraryError(f"{what}: {directory!r} is not of the form '{EXPERTS_DIR}/NAME' (an expert "
                         "directory inside this library)")
    try:
      return files.inside(self.root, directory, what)
    except files.FileCheckError as e:
      raise LibraryError(str(e)) from None

  def expert_dir(self, name: str) -> epath.Path:
    return self._directory(name, self.entry(name))

  def resolve(self, selection: str | Sequence[str]) -> list[str]:
    """'all', a comma-separated string or a list of names -> names, in library order for 'all'
    and in the given order otherwise; unknown names are an error."""
    if isinstance(selection, str):
      if selection == "all":
        return self.names()
      selection = [s for s in selection.split(",") if s]
    for name in selection:
      self.entry(name)
    if len(set(selection)) != len(selection):
      raise LibraryError(f"--experts: names repeat in {list(selection)}")
    if not selection:
      raise LibraryError(f"{self.root}: no experts selected")
    return list(selection)

  def load(self, name: str, backbone_fingerprint: Optional[str] = None):
    """(expert parameter tree, ExpertMetadata) of one expert, every file checked against the
    manifest's sha256 before it is parsed (unless the library was opened without checks)."""
    entry = self.entry(name)
    if not self.check_integrity:
      files.warn_unchecked(f"expert {name!r}")
    try:
      return expert_files.load_expert(os.fspath(self._directory(name, entry)), backbone_fingerprint,
                                      recorded=entry["files"], what=f"expert {name!r}",
                                      check_integrity=self.check_integrity)
    except files.FileCheckError as e:
      raise LibraryError(str(e)) from None

  def load_stack(self, names: Sequence[str], backbone_fingerprint: Optional[str] = None
                 ) -> tuple[ExpertStack, list[expert_files.ExpertMetadata]]:
    """(the experts stacked [E, ...] in the order of `names`, their metadata): each file read
    once, checked against the manifest's sha256 as it is read (unless the library was opened
    without checks), and stacked once. All must share one expert config."""
    entries = [self.entry(name) for name in names]
    directories = [os.fspath(self._directory(n, e)) for n, e in zip(names, entries)]
    if not self.check_integrity:
      for name in names:
        files.warn_unchecked(f"expert {name!r}")
    try:
      return ExpertStack.load(names, directories, recorded=[e["files"] for e in entries],
                              backbone_fingerprint=backbone_fingerprint,
                              check_integrity=self.check_integrity)
    except (files.FileCheckError, ExpertStackError) as e:
      raise LibraryError(str(e)) from None

  # ------------------------------------------------------------------ writes
  def holds_identical(self, name: str, expert_dir: str | os.PathLike) -> bool:
    """Whether `name` is in the library with exactly the files of `expert_dir` (so adding it
    again, as a rerun of an interrupted add does, has nothing to do)."""
    entry = self.manifest()["experts"].get(name)
    return entry is not None and entry["files"] == _digests(epath.Path(expert_dir))

  def add(self, expert_dir: str | os.PathLike, name: Optional[str] = None,
          keys: Optional[Sequence[dict[str, Any]]] = None,
          provenance: Optional[dict[str, Any]] = None) -> str:
    """Copies a trainer-written expert directory into the library under `name` (default: its
    metadata name) with optional retrieval `keys`; returns the name. The same expert added again
    (same files) is a no-op; another expert under a name already present (or under a name that
    maps to another expert's directory), or one trained on another backbone than the library's,
    is refused."""
    source = epath.Path(expert_dir)
    _, metadata = expert_files.load_expert(os.fspath(source))
    name = name or metadata.name
    dirname = safe_name(name)
    directory = f"{EXPERTS_DIR}/{dirname}"
    digests = _digests(source)
    if keys is not None:
      keys = check_keys(keys, f"retrieval keys of {name!r}")
    if self.manifest()["experts"].get(name, {}).get("files") == digests:
      return name
    experts = self.root / EXPERTS_DIR
    experts.mkdir(parents=True, exist_ok=True)
    staged = experts / f".{dirname}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    staged.mkdir()
    try:
      for file in _EXPERT_FILES:
        (source / file).copy(staged / file)
      if _digests(staged) != digests:
        raise LibraryError(f"{source}: changed while it was being copied into the library; add it again")
      with self._lock():
        self._clear_leftovers()
        manifest = self.manifest()
        if manifest["experts"].get(name, {}).get("files") == digests:
          return name  # a concurrent add of the same expert landed first
        self._check_new(manifest, name, dirname, metadata)
        target = self.root / directory
        adopted = target.exists()  # left complete by an add killed before its manifest write
        if adopted and _digests(target) != digests:
          raise LibraryError(f"{target}: exists, holds another expert's files, and no manifest "
                             "entry names it; move it out of the library (or remove it) and add again")
        keys_file = self._write_keys(name, keys) if keys is not None else None
        if not adopted:
          staged.rename(target)
        manifest["backbone_fingerprint"] = manifest["backbone_fingerprint"] or metadata.backbone_fingerprint
        checkpoint = metadata.training_config.get("backbone_checkpoint")
        manifest["backbone_checkpoint"] = manifest.get("backbone_checkpoint") or checkpoint
        entry = {"directory": directory, "task": metadata.task, "prompt": metadata.prompt,
                 "kind": metadata.expert_config.get("kind"), "steps": metadata.steps, "files": digests,
                 "keys": keys is not None, "added": _now(),
                 "provenance": provenance or {"source": os.fspath(source)}}
        if keys_file is not None:
          entry["keys_file"] = keys_file
        manifest["experts"][name] = entry
        self._write_manifest(manifest)
        self._append_history({"action": "add", "name": name, "files": digests})
    finally:
      if staged.exists():
        staged.rmtree()
    return name

  def _check_new(self, manifest, name: str, dirname: str, metadata) -> None:
    if name in manifest["experts"]:
      raise LibraryError(f"{self.root / MANIFEST}: an expert named {name!r} is already in the library "
                         "with other files; experts are never replaced (remove it first, or add "
                         "under another --name)")
    for other, entry in manifest["experts"].items():
      if entry["directory"] == f"{EXPERTS_DIR}/{dirname}":
        raise LibraryError(f"expert name {name!r} maps to the directory {entry['directory']!r}, which "
                           f"expert {other!r} already uses; add it under another --name")
    fingerprint = manifest["backbone_fingerprint"]
    if fingerprint and metadata.backbone_fingerprint != fingerprint:
      raise LibraryError(f"expert {name!r} was trained on backbone {metadata.backbone_fingerprint}; "
                         f"this library's experts use {fingerprint}")

  def _write_keys(self, name: str, keys: Sequence[dict[str, Any]]) -> dict[str, Any]:
    path = self.keys_path(name)
    data = "".join(json.dumps(k, sort_keys=True, allow_nan=False) + "\n" for k in keys).encode()
    if path.exists():
      if path.read_bytes() != data:  # the same keys, left by an interrupted add, are kept
        raise LibraryError(f"{path}: retrieval keys for {name!r} already exist (other keys; no manifest "
                           "entry names them) and are never rewritten; move the file out and add again")
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      files.write_atomically(path, data)
    digest, size = files.digest_file(path)
    return {"sha256": digest, "bytes": size}

  def clear_interrupted_adds(self) -> None:
    """Removes what adds killed on this host left staged (their processes are gone)."""
    with self._lock():
      self._clear_leftovers()

  def _clear_leftovers(self) -> None:
    """Removes staged directories of interrupted adds on this host whose process is gone
    (called under the lock; a live add's staging is left alone)."""
    for staged in self.staged_leftovers():
      match = _STAGED.match(staged.name)
      if match and match["host"] == _host() and not _pid_alive(int(match["pid"])):
        staged.rmtree()

  def staged_leftovers(self) -> list[epath.Path]:
    """Expert directories being staged, or left half-copied by an interrupted add."""
    experts = self.root / EXPERTS_DIR
    if not experts.is_dir():
      return []
    return sorted(p for p in experts.iterdir() if _STAGED.match(p.name) and p.is_dir())

  def remove(self, name: str) -> None:
    """Deletes an expert, its keys and its cached embeddings (recorded in the history)."""
    with self._lock():
      manifest = self.manifest()
      entry = manifest["experts"].get(name)
      if entry is None:
        raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}")
      directory = self._directory(name, entry)  # checked before anything is deleted
      paths = [directory, self.keys_path(name)] + self._embedding_files(name)
      del manifest["experts"][name]
      self._write_manifest(manifest)
      self._append_history({"action": "remove", "name": name, "files": entry["files"]})
      for path in paths:
        link = files.is_local(path) and os.path.islink(os.fspath(path))
        if path.is_dir() and not link:
          path.rmtree()
        elif path.exists() or link:
          path.unlink()

  # ------------------------------------------------------------------ retrieval keys
  def keys_path(self, name: str) -> epath.Path:
    return self.root / KEYS_DIR / f"{safe_name(name)}.jsonl"

  def keys(self, name: str) -> list[dict[str, Any]]:
    """The stored training instances of `name`: [{"inputs", "answer_choices"?, ...}], checked
    against the manifest's sha256 when it records one."""
    path = self.keys_path(name)
    if not path.exists():
      raise LibraryError(f"{path}: expert {name!r} has no retrieval keys; add it with "
                         "`elm-jax library add --keys=auto|FILE` or ExpertLibrary.add(keys=...)")
    recorded = self.entry(name).get("keys_file") or {}
    try:
      data = files.read_verified(path, recorded.get("sha256"), recorded.get("bytes"),
                                 f"retrieval keys of expert {name!r}", check=self.check_integrity)
    except files.FileCheckError as e:
      raise LibraryError(str(e)) from None
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
      if line.strip():
        try:
          rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
          raise LibraryError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
    return check_keys(rows, str(path))

  def embeddings_path(self, name: str, embedder: str, text_format: str) -> epath.Path:
    return self.root / "retrieval" / "embeddings" / embedder / text_format / f"{safe_name(name)}.npy"

  def _embedding_files(self, name: str) -> list[epath.Path]:
    base = self.root / "retrieval" / "embeddings"
    return list(base.glob(f"*/*/{safe_name(name)}.npy")) if base.exists() else []

  # ------------------------------------------------------------------ verification
  def verify(self, names: Optional[Sequence[str]] = None) -> list[str]:
    """Problems found (empty when every file matches its recorded size and sha256 and nothing
    is left over from an interrupted add)."""
    manifest = self.manifest()
    problems = []
    for name in names or sorted(manifest["experts"]):
      entry = manifest["experts"].get(name)
      if entry is None:
        problems.append(f"{name}: not in the manifest")
        continue
      try:
        directory = self._directory(name, entry)
      except LibraryError as e:
        problems.append(str(e))
        continue
      recorded = [(directory / file, digest) for file, digest in entry["files"].items()]
      if entry.get("keys_file"):
        recorded.append((self.keys_path(name), entry["keys_file"]))
      for path, digest in recorded:
        if not path.exists():
          problems.append(f"{path}: missing")
          continue
        sha, size = files.digest_file(path)
        if size != digest["bytes"]:
          problems.append(f"{path}: {size} bytes, the manifest records {digest['bytes']} (truncated or replaced)")
        elif sha != digest["sha256"]:
          problems.append(f"{path}: sha256 {sha[:12]}..., the manifest records {digest['sha256'][:12]}... (changed)")
    if not names:
      problems.extend(f"{p}: left by an interrupted or running `library add` (the next add on this "
                      "host clears it once its process is gone)" for p in self.staged_leftovers())
      known = {entry["directory"] for entry in manifest["experts"].values()}
      experts = self.root / EXPERTS_DIR
      for path in sorted(experts.iterdir()) if experts.is_dir() else []:
        if not path.name.startswith(".") and f"{EXPERTS_DIR}/{path.name}" not in known:
          problems.append(f"{path}: no manifest entry names it (an add interrupted before its "
                          "manifest update; adding the same expert again adopts it)")
    return problems


def _digests(directory: epath.Path) -> dict[str, dict[str, Any]]:
  out = {}
  for file in _EXPERT_FILES:
    path = directory / file
    if not path.is_file():
      raise LibraryError(f"{path}: not found; an expert directory holds {' and '.join(_EXPERT_FILES)}")
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


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
