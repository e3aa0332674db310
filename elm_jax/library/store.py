"""The Expert Library: a directory of expert directories, a manifest and an append-only history.

    <library>/manifest.json            names, metadata, content hashes, the backbone fingerprint
    <library>/history.jsonl            one line per add / remove, never rewritten
    <library>/experts/<name>/          tensors.safetensors + expert.json, as the trainer wrote them
    <library>/retrieval/keys/<name>.jsonl            training instances used as retrieval keys
    <library>/retrieval/embeddings/<embedder>/<format>/<name>.npy   their embeddings (a cache)
    <library>/.lock                    the writers' lock
    <library>/.trash/<name>.<id>/      an expert being removed, with its record (removal.json)

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

A remove is interrupted safely at any point too (`ExpertLibrary.remove`): it writes a record of
the removal into `.trash/<name>.<id>/` first, renames the expert's directory, keys and cached
embeddings into that directory, drops the manifest entry, appends to the history, and deletes
the trash directory last. After a kill the library is either as it was, or holds a pending
removal that `verify` reports and that the same `remove`, `verify --repair` or the next `add`
finishes. An expert whose removal is pending cannot be loaded.

No symbolic links. A library lives on shared disks and buckets, so a link planted in it must not
become a way out: a library holds no symbolic link below its root (elm_jax never writes one),
and every operation refuses, naming the link, to go through one, wherever it is (`experts/`,
an expert's directory or files, `retrieval/`, the keys and embedding directories and files,
`manifest.json`, `history.jsonl`, `.lock`, `.trash/`), even one that points inside the library.
The root itself may be a link. `verify` lists every link in the library. (The check is made
just before each use; the lock and the history are also opened with O_NOFOLLOW. A process that
plants a link between the check and the use, racing the command, is not guarded against.) Paths
in the manifest are unique per entry: two entries naming one directory, two names sharing one
keys file, or a name given twice in manifest.json are refused when the manifest is read.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
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
EMBEDDINGS_DIR = "retrieval/embeddings"
LOCK = ".lock"
TRASH_DIR = ".trash"
REMOVAL_RECORD = "removal.json"
_EXPERT_FILES = (expert_files.TENSORS_FILE, expert_files.METADATA_FILE)
# A staged expert directory: experts/.<directory name>.<host>.<pid>.<hex>.tmp
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[\w-]*)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp$")
# An expert being removed: .trash/<directory name>.<hex id>/
_TRASHED = re.compile(r"^(?P<dirname>.+)\.(?P<id>[0-9a-f]{32})$")


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


def _link_description(root: epath.Path, link: str) -> str:
  """"LINK: is a symbolic link ..." saying where it resolves, inside or outside the library."""
  real, real_root = os.path.realpath(link), os.path.realpath(os.fspath(root))
  if real != real_root and os.path.commonpath([real_root, real]) == real_root:
    return f"{link}: is a symbolic link to {real} inside the library"
  return f"{link}: is a symbolic link that resolves to {real}, outside the library {root}"


def _link_error(root: epath.Path, link: str, purpose: str) -> LibraryError:
  """The one-line refusal to `purpose` through the symbolic link `link` inside the library."""
  return LibraryError(f"{_link_description(root, link)}; refusing to {purpose} through it (a library "
                      "holds no symbolic links)")


def _unique_keys(path: epath.Path):
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


def _is_directory_name(name: str) -> bool:
  try:
    return expert_files.directory_name(name) == name
  except expert_files.ExpertFileError:
    return False


def _delete(path: str | os.PathLike) -> None:
  """Deletes a file, a link (never what it points to) or a directory tree, if it is there."""
  path = epath.Path(path)
  if files.is_local(path):
    local = os.fspath(path)
    if os.path.islink(local) or os.path.isfile(local):
      os.unlink(local)
    elif os.path.isdir(local):
      shutil.rmtree(local)  # removes links inside, never follows them
  elif path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def _check_unique_paths(experts: dict[str, Any], where: str) -> None:
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
    if not self._path(MANIFEST, "read the manifest").exists():
      if not create:
        raise LibraryError(f"{self.root / MANIFEST}: not found; {self.root} is not an expert library "
                           "(create one with `elm-jax library add --library=DIR EXPERT_DIR`)")
      self.root.mkdir(parents=True, exist_ok=True)
      with self._lock():
        if not (self.root / MANIFEST).exists():
          self._write_manifest({"format_version": FORMAT_VERSION, "backbone_fingerprint": None,
                                "backbone_checkpoint": None, "experts": {}})

  # ------------------------------------------------------------------ paths, manifest and lock
  def _path(self, relative: str, purpose: str) -> epath.Path:
    """`root / relative` ('/'-separated), refused (naming the link and `purpose`, e.g. "remove
    expert 'x'") when it or any directory between it and the root is a symbolic link."""
    if files.is_local(self.root):
      current = os.fspath(self.root)
      for part in relative.split("/"):
        current = os.path.join(current, part)
        if os.path.islink(current):
          raise _link_error(self.root, current, purpose)
        if not os.path.exists(current):
          break
    return self.root / relative

  def _open_local(self, relative: str, flags: int, purpose: str) -> int:
    """A descriptor of a file of the library opened without following a link (O_NOFOLLOW), so
    a link planted after `_path` checked it is refused too."""
    path = os.fspath(self._path(relative, purpose))
    try:
      return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise _link_error(self.root, path, purpose) from None
      raise LibraryError(f"{path}: cannot be opened to {purpose} ({e.strerror or e})") from None

  @contextlib.contextmanager
  def _lock(self) -> Iterator[None]:
    if not files.is_local(self.root):
      yield
      return
    fd = self._open_local(LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "take the library's lock")
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def manifest(self) -> dict[str, Any]:
    """The manifest, every entry's fields checked (a damaged entry is named, not tripped over),
    with no name given twice and no two entries sharing a directory or a keys file."""
    path = self._path(MANIFEST, "read the manifest")
    try:
      manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys(path))
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
    _check_unique_paths(manifest["experts"], str(path))
    return manifest

  def _write_manifest(self, manifest: dict[str, Any]) -> None:
    files.write_atomically(self._path(MANIFEST, "write the manifest"),
                     json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode())

  def _check_bookkeeping(self) -> None:
    """Refuses, before a writer changes anything, a link at the manifest or the history (each
    write checks again)."""
    self._path(MANIFEST, "write the manifest")
    self._path(HISTORY, "append to the history")

  def _append_history(self, record: dict[str, Any]) -> None:
    line = (json.dumps({"time": _now(), **record}, sort_keys=True) + "\n").encode()
    if not files.is_local(self.root):
      with (self.root / HISTORY).open("ab") as f:
        f.write(line)
      return
    fd = self._open_local(HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "append to the history")
    try:
      os.write(fd, line)
    finally:
      os.close(fd)

  def history(self) -> list[dict[str, Any]]:
    path = self._path(HISTORY, "read the history")
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
    """The manifest entry of `name`; an error when there is none or its removal is pending."""
    experts = self.manifest()["experts"]
    if name not in experts:
      raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}; the library holds "
                         f"{len(experts)} expert(s): {', '.join(sorted(experts)[:10])}"
                         f"{' ...' if len(experts) > 10 else ''}")
    pending = self._pending_removal(name, f"look up expert {name!r}")
    if pending is not None:
      raise LibraryError(f"{pending}: expert {name!r}: an interrupted `library remove` of it is pending; "
                         f"run `elm-jax library verify --repair --library={self.root}` (or the same "
                         "remove again) to finish it")
    return experts[name]

  def _directory(self, name: str, entry: dict[str, Any], purpose: Optional[str] = None) -> epath.Path:
    """The expert's directory: `experts/<one name>` inside the library, with no symbolic link on
    the way to it or to its recorded files, or an error naming the field or the link."""
    purpose = purpose or f"load expert {name!r}"
    what = f"{self.root / MANIFEST}: experts[{name!r}].directory"
    directory = entry["directory"]
    dirname = directory[len(EXPERTS_DIR) + 1:]
    if not directory.startswith(EXPERTS_DIR + "/") or "/" in dirname:
      raise LibraryError(f"{what}: {directory!r} is not of the form '{EXPERTS_DIR}/NAME' (an expert "
                         "directory inside this library)")
    self._path(directory, purpose)
    try:
      path = files.inside(self.root, directory, what)
    except files.FileCheckError as e:
      raise LibraryError(str(e)) from None
    if not _is_directory_name(dirname):
      raise LibraryError(f"{what}: {directory!r} does not name an expert directory ('{EXPERTS_DIR}/NAME', "
                         "NAME as `library add` writes it: letters, digits and -_.@, no leading '.')")
    for file in entry["files"]:
      self._path(f"{directory}/{file}", purpose)
    return path

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
    return (entry is not None and entry["files"] == _digests(epath.Path(expert_dir))
            and self._pending_removal(name, f"add expert {name!r}") is None)

  def add(self, expert_dir: str | os.PathLike, name: Optional[str] = None,
          keys: Optional[Sequence[dict[str, Any]]] = None,
          provenance: Optional[dict[str, Any]] = None) -> str:
    """Copies a trainer-written expert directory into the library under `name` (default: its
    metadata name) with optional retrieval `keys`; returns the name. The same expert added again
    (same files) is a no-op; another expert under a name already present (or under a name that
    maps to another expert's directory), or one trained on another backbone than the library's,
    is refused."""
    source = epath.Path(expert_dir)
    metadata = expert_files.check_expert(os.fspath(source))  # parameter list, finite values
    name = name or metadata.name
    dirname = safe_name(name)
    directory = f"{EXPERTS_DIR}/{dirname}"
    digests = _digests(source)
    if keys is not None:
      keys = check_keys(keys, f"retrieval keys of {name!r}")
    purpose = f"add expert {name!r}"
    if self._trashed(purpose):  # an interrupted remove (of this expert, say) is finished first
      with self._lock():
        self._finish_removals()
    if self.manifest()["experts"].get(name, {}).get("files") == digests:
      return name
    experts = self._path(EXPERTS_DIR, purpose)
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
        self._finish_removals()
        manifest = self.manifest()
        if manifest["experts"].get(name, {}).get("files") == digests:
          return name  # a concurrent add of the same expert landed first
        self._check_new(manifest, name, dirname, metadata)
        self._check_bookkeeping()
        target = self._path(directory, purpose)
        adopted = target.exists()  # left complete by an add killed before its manifest write
        if adopted and _digests(target) != digests:
          raise LibraryError(f"{target}: exists, holds another expert's files, and no manifest "
                             "entry names it; move it out of the library (or remove it) and add again")
        keys_file = self._write_keys(name, keys, purpose) if keys is not None else None
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

  def _write_keys(self, name: str, keys: Sequence[dict[str, Any]], purpose: str) -> dict[str, Any]:
    path = self.keys_path(name, purpose)
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

  def repair(self, purpose: str = "repair the library") -> list[str]:
    """Finishes what killed writers left: every pending removal is completed (and the trash of
    a finished one deleted), and the staged copies of adds killed on this host are removed.
    Returns one line per thing done; `purpose` is what a refusal (a link) names."""
    with self._lock():
      done = [f"finished the interrupted removal of {name!r}" if name else
              f"{path}: deleted (left by an interrupted `library remove`)"
              for name, path in self._finish_removals(purpose)]
      done += [f"{path}: deleted (a staged copy left by an interrupted `library add`)"
               for path in self._clear_leftovers(purpose)]
    return done

  def _clear_leftovers(self, purpose: str = "clear what an interrupted `library add` left"
                       ) -> list[epath.Path]:
    """Removes staged directories of interrupted adds on this host whose process is gone
    (called under the lock; a live add's staging is left alone); returns them."""
    experts = self._path(EXPERTS_DIR, purpose)
    if not experts.is_dir():
      return []
    cleared = []
    for staged in sorted(experts.iterdir()):
      match = _STAGED.match(staged.name)
      if match:
        self._path(f"{EXPERTS_DIR}/{staged.name}", purpose)
        if staged.is_dir() and match["host"] == _host() and not _pid_alive(int(match["pid"])):
          _delete(staged)
          cleared.append(staged)
    return cleared

  def staged_leftovers(self) -> list[epath.Path]:
    """Expert directories being staged, or left half-copied by an interrupted add (links,
    which no add writes, are not among them: `verify` reports those as links)."""
    experts = self.root / EXPERTS_DIR
    if not experts.is_dir():
      return []
    return sorted(p for p in experts.iterdir() if _STAGED.match(p.name) and p.is_dir()
                  and not (files.is_local(p) and os.path.islink(os.fspath(p))))

  # ------------------------------------------------------------------ removal
  def remove(self, name: str) -> bool:
    """Deletes an expert, its keys and its cached embeddings (recorded in the history), in
    steps a kill can interrupt at any moment (see the module docstring): a record in
    `.trash/<name>.<id>/`, the files renamed into it, the manifest entry dropped, the history
    appended, the trash deleted. Pending removals (this one's, after a kill) are finished
    first, so running the same remove again completes an interrupted one. Returns False, doing
    nothing, when the expert is gone and the history's last word on it is its removal (a
    rerun of a remove that had finished)."""
    purpose = f"remove expert {name!r}"
    with self._lock():
      finished = [n for n, _ in self._finish_removals(purpose)]
      manifest = self.manifest()
      entry = manifest["experts"].get(name)
      if entry is None:
        if name in finished:
          return True
        if [h.get("action") for h in self.history() if h.get("name") == name][-1:] == ["remove"]:
          return False
        raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}")
      self._removal_moves(name, entry, manifest, purpose)  # every path checked before anything is written
      self._check_bookkeeping()
      removal_id = uuid.uuid4().hex
      trash = self._path(f"{TRASH_DIR}/{safe_name(name)}.{removal_id}", purpose)
      trash.mkdir(parents=True)
      record = {"name": name, "id": removal_id, "entry": entry}
      files.write_atomically(trash / REMOVAL_RECORD, json.dumps(record, sort_keys=True).encode())
      self._finish_removal(trash, record, recovered=False)
    return True

  def _removal_moves(self, name: str, entry: dict[str, Any], manifest: dict[str, Any], purpose: str
                     ) -> list[tuple[epath.Path, str]]:
    """(path in the library, path in the trash directory) of every file of `name` still in
    place: its directory, keys and cached embeddings, each checked (inside the library, no
    link on the way, not another entry's)."""
    directory = self._directory(name, entry, purpose)
    for other, other_entry in manifest["experts"].items():
      if other != name and (other_entry["directory"] == entry["directory"]
                            or safe_name(other) == safe_name(name)):
        raise LibraryError(f"{self.root / MANIFEST}: experts[{other!r}] uses the directory or keys file "
                           f"of expert {name!r} too; refusing to {purpose}, which would delete them")
    moves = [(directory, "expert"), (self.keys_path(name, purpose), "keys.jsonl")]
    for path in self._embedding_files(name, purpose):
      moves.append((path, f"embeddings/{path.parent.parent.name}/{path.parent.name}.npy"))
    return [(path, dest) for path, dest in moves
            if (os.path.lexists(os.fspath(path)) if files.is_local(path) else path.exists())]

  def _finish_removal(self, trash: epath.Path, record: dict[str, Any], recovered: bool) -> None:
    """Completes the removal `record` describes (called under the lock), each step skipped when
    an interrupted run did it: the files renamed into `trash` (local libraries; on object
    stores, where a directory cannot be renamed, they are deleted in place after the manifest
    update), the manifest entry dropped, the history appended, then `trash` deleted (its
    record last, so a kill leaves the record while anything of the expert remains)."""
    name, entry = record["name"], record["entry"]
    purpose = f"finish removing expert {name!r}" if recovered else f"remove expert {name!r}"
    manifest = self.manifest()
    listed = manifest["experts"].get(name)
    if listed is not None and listed["directory"] != entry["directory"]:
      raise LibraryError(f"{trash / REMOVAL_RECORD}: records the removal of {name!r} from "
                         f"{entry['directory']!r}, but the manifest lists it in {listed['directory']!r}; "
                         "move the trash directory out of the library if the expert is to stay")
    moves = self._removal_moves(name, entry, manifest, purpose)
    local = files.is_local(self.root)
    if local:
      for path, dest in moves:
        target = trash / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(os.fspath(target)):  # else the rename was done; `path` is not the expert's
          os.rename(os.fspath(path), os.fspath(target))
    if listed is not None:
      del manifest["experts"][name]
      self._write_manifest(manifest)
    if not recovered or not any(h.get("removal") == record["id"] for h in self.history()):
      self._append_history({"action": "remove", "name": name, "files": entry["files"],
                            "removal": record["id"]})
    for path, _ in ([] if local else moves):
      _delete(path)
    for child in sorted(trash.iterdir()):
      if child.name != REMOVAL_RECORD:
        _delete(child)
    _delete(trash / REMOVAL_RECORD)
    _delete(trash)
    with contextlib.suppress(OSError):  # still holds another removal's trash: kept
      trash.parent.rmdir()

  def _trashed(self, purpose: str) -> list[epath.Path]:
    """The directories in `.trash/`: removals interrupted (or, without the lock, running)."""
    trash = self._path(TRASH_DIR, purpose)
    if not trash.is_dir():
      return []
    for path in trash.iterdir():
      self._path(f"{TRASH_DIR}/{path.name}", purpose)
    return sorted(trash.iterdir())

  def _removal_record(self, trashed: epath.Path) -> Optional[dict[str, Any]]:
    """The record of a removal in `trashed`, checked; None when it has none (a removal killed
    before its record was written, or after it was deleted: nothing of an expert is there)."""
    path = trashed / REMOVAL_RECORD
    self._path(f"{TRASH_DIR}/{trashed.name}/{REMOVAL_RECORD}", "read a removal record")
    if not path.exists():
      return None
    try:
      record = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise LibraryError(f"{path}: not valid JSON ({e})") from None
    match = _TRASHED.match(trashed.name)
    if not (isinstance(record, dict) and isinstance(record.get("name"), str) and match
            and isinstance(record.get("id"), str) and record["id"] == match["id"]):
      raise LibraryError(f"{path}: expected a removal record {{name, id, entry}} whose id ends the "
                         f"directory name {trashed.name!r}; got {str(record)[:200]}")
    _check_entry(record["name"], record.get("entry"), str(path))
    if safe_name(record["name"]) != match["dirname"]:
      raise LibraryError(f"{path}: records the removal of {record['name']!r}, whose directory name is "
                         f"not {match['dirname']!r}")
    return record

  def _pending_removal(self, name: str, purpose: str) -> Optional[epath.Path]:
    """The trash directory of a recorded, unfinished removal of `name`, if there is one."""
    dirname = safe_name(name)
    for trashed in self._trashed(purpose):
      match = _TRASHED.match(trashed.name)
      if match and match["dirname"] == dirname and (trashed / REMOVAL_RECORD).exists():
        return trashed
    return None

  def _finish_removals(self, purpose: str = "finish an interrupted `library remove`"
                       ) -> list[tuple[Optional[str], epath.Path]]:
    """Finishes every recorded removal in `.trash/` and deletes what holds no record (called
    under the lock, so no removal is running); returns (name or None, trash directory)."""
    done = []
    for trashed in self._trashed(purpose):
      record = self._removal_record(trashed) if trashed.is_dir() else None
      if record is None:
        _delete(trashed)
      else:
        self._finish_removal(trashed, record, recovered=True)
      done.append((record and record["name"], trashed))
    with contextlib.suppress(OSError):  # an empty .trash left by a kill after the last removal
      if (self.root / TRASH_DIR).is_dir():
        (self.root / TRASH_DIR).rmdir()
    return done

  # ------------------------------------------------------------------ retrieval keys
  def keys_path(self, name: str, purpose: Optional[str] = None) -> epath.Path:
    """retrieval/keys/<name>.jsonl, refused when a link lies on the way to it."""
    return self._path(f"{KEYS_DIR}/{safe_name(name)}.jsonl",
                      purpose or f"use the retrieval keys of {name!r}")

  def keys(self, name: str) -> list[dict[str, Any]]:
    """The stored training instances of `name`: [{"inputs", "answer_choices"?, ...}], checked
    against the manifest's sha256 when it records one."""
    recorded = self.entry(name).get("keys_file") or {}
    path = self.keys_path(name, f"read the retrieval keys of {name!r}")
    if not path.exists():
      raise LibraryError(f"{path}: expert {name!r} has no retrieval keys; add it with "
                         "`elm-jax library add --keys=auto|FILE` or ExpertLibrary.add(keys=...)")
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

  def embeddings_path(self, name: str, embedder: str, text_format: str,
                      purpose: Optional[str] = None) -> epath.Path:
    """retrieval/embeddings/<embedder>/<text_format>/<name>.npy (the cache of `name`'s key
    embeddings), refused when a link lies on the way to it."""
    for field, value in (("embedder", embedder), ("text_format", text_format)):
      if not _is_directory_name(value):
        raise LibraryError(f"{field}: {value!r} is not usable as a directory name of the embedding cache")
    return self._path(f"{EMBEDDINGS_DIR}/{embedder}/{text_format}/{safe_name(name)}.npy",
                      purpose or f"use the embedding cache of {name!r}")

  def _embedding_files(self, name: str, purpose: str) -> list[epath.Path]:
    """The cached embeddings of `name`, of every embedder and text format, found without
    following a link (one on the way is refused)."""
    base = self._path(EMBEDDINGS_DIR, purpose)
    if not base.is_dir():
      return []
    found = []
    for embedder in sorted(base.iterdir()):
      if not self._path(f"{EMBEDDINGS_DIR}/{embedder.name}", purpose).is_dir():
        continue
      for text_format in sorted(embedder.iterdir()):
        relative = f"{EMBEDDINGS_DIR}/{embedder.name}/{text_format.name}"
        if self._path(relative, purpose).is_dir():
          path = self._path(f"{relative}/{safe_name(name)}.npy", purpose)
          if path.exists():
            found.append(path)
    return found

  # ------------------------------------------------------------------ verification
  def _links(self) -> list[str]:
    """One line per symbolic link anywhere below the root (none is followed)."""
    if not files.is_local(self.root):
      return []
    out = []
    for base, dirs, names in os.walk(os.fspath(self.root)):
      for name in sorted(dirs + names):
        path = os.path.join(base, name)
        if os.path.islink(path):
          out.append(f"{_link_description(self.root, path)} (a library holds no symbolic links and "
                     "every command refuses to go through one: replace it by what it points to, or "
                     "delete it)")
    return out

  def _pending_problems(self, names: Optional[Sequence[str]]) -> tuple[set[str], list[str]]:
    """(names whose removal is pending, one line per removal left in `.trash/`: of `names`, or
    of every expert when `names` is empty), each saying how to finish it."""
    pending, problems = set(), []
    finish = (f"run `elm-jax library verify --repair --library={self.root}` (or the same "
              "`library remove` again) to finish it")
    try:
      trashed = self._trashed("verify the library")
    except LibraryError as e:
      return pending, [str(e)]
    for path in trashed:
      try:
        record = self._removal_record(path) if path.is_dir() else None
      except LibraryError as e:
        problems.append(f"{e}; {finish}")
        continue
      if record is None:
        if not names:
          problems.append(f"{path}: left by an interrupted `library remove` (no record, so nothing of "
                          f"an expert is in it); `elm-jax library verify --repair --library={self.root}` "
                          "deletes it")
      elif not names or record["name"] in names:
        pending.add(record["name"])
        problems.append(f"{path}: an interrupted `library remove` of {record['name']!r} "
                        f"({_count_files(path) - 1} of its files are here); {finish}")
    return pending, problems

  def verify(self, names: Optional[Sequence[str]] = None) -> list[str]:
    """Problems found (empty when every file matches its recorded size and sha256, nothing is
    left over from an interrupted add or remove, and the library holds no symbolic link). A
    pending removal is one line saying how to finish it, not its expert's files one by one."""
    manifest = self.manifest()
    pending, problems = self._pending_problems(names)
    for name in names or sorted(manifest["experts"]):
      entry = manifest["experts"].get(name)
      if name in pending:  # reported once, with how to finish it
        continue
      if entry is None:
        problems.append(f"{name}: not in the manifest")
        continue
      try:
        directory = self._directory(name, entry, f"verify expert {name!r}")
        keys_path = self.keys_path(name, f"verify expert {name!r}") if entry.get("keys_file") else None
      except LibraryError as e:
        problems.append(str(e))
        continue
      recorded = [(directory / file, digest) for file, digest in entry["files"].items()]
      if keys_path is not None:
        recorded.append((keys_path, entry["keys_file"]))
      found = len(problems)
      for path, digest in recorded:
        if not path.exists():
          problems.append(f"{path}: missing")
          continue
        sha, size = files.digest_file(path)
        if size != digest["bytes"]:
          problems.append(f"{path}: {size} bytes, the manifest records {digest['bytes']} (truncated or replaced)")
        elif sha != digest["sha256"]:
          problems.append(f"{path}: sha256 {sha[:12]}..., the manifest records {digest['sha256'][:12]}... (changed)")
      if len(problems) == found:  # the recorded bytes: now their content (parameter list, finite values)
        problems.extend(expert_files.expert_problems(os.fspath(directory)))
    if not names:
      problems.extend(self._links())
      problems.extend(f"{p}: left by an interrupted or running `library add` (the next add on this "
                      "host clears it once its process is gone)" for p in self.staged_leftovers())
      known = {entry["directory"] for entry in manifest["experts"].values()}
      experts = self.root / EXPERTS_DIR
      if files.is_local(experts) and os.path.islink(os.fspath(experts)):
        experts = None  # reported as a link; not listed through it
      for path in sorted(experts.iterdir()) if experts and experts.is_dir() else []:
        if (not path.name.startswith(".") and f"{EXPERTS_DIR}/{path.name}" not in known
            and not (files.is_local(path) and os.path.islink(os.fspath(path)))):  # links: listed above
          problems.append(f"{path}: no manifest entry names it (an add interrupted before its "
                          "manifest update; adding the same expert again adopts it)")
    return problems


def _count_files(path: epath.Path) -> int:
  if not files.is_local(path):
    return sum(1 for p in path.rglob("*") if p.is_file())
  return sum(len(names) for _, _, names in os.walk(os.fspath(path)))


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
