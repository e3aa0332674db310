"""The Expert Library: a directory of expert directories, a manifest and an append-only history
(`ExpertLibrary`), with the retrieval keys and the embedding cache kept beside them.

The layout on disk, the rule that no path is reached through a symbolic link, and the undoing
of a failed write belong to `paths.py`; what the manifest, a removal's record and the retrieval
keys hold, and how each is checked as it is read, to `records.py`; the kill-safe removal
(`remove`, pending removals, `verify --repair`), to `removal.py`. This module owns the rest:
opening (or creating) a library, reading and writing the manifest and the history under the
writers' lock, looking experts up and loading them, adding them, their retrieval keys and
embedding cache paths, and `verify`.

The library may live on any path `etils.epath` handles (a local directory or a cloud bucket),
and may come from elsewhere: every path read from its manifest must stay inside it
(`files.inside`), and every expert file is checked against the manifest's sha256 as it is
loaded (`files.read_verified`). Every file is written to a temporary name and renamed into
place, so a reader never sees half a file. Writers take an exclusive lock (`<library>/.lock`,
`fcntl.flock`) around each read-modify-write of the manifest; on object stores, where no such
lock exists, writes are atomic per file but concurrent writers must be kept apart by the caller.

Adding an expert writes only new files: existing experts, keys and embeddings are never touched.
An add copies the expert into a staged directory, then, under the lock, writes its keys,
renames the staged directory into place, appends to the history and writes the manifest (the
step that makes it done). An add interrupted at any point can be run again: experts already
there with the same content are skipped, a directory a killed add left complete is adopted,
and what an interrupted add left staged is reported by `verify` and cleared by the next add.
An add whose write fails (a full disk) puts back what it did and raises one line naming the
file, the bytes it needed, the expert and the library: nothing of the expert is left, nor a
library the add began.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence

from etils import epath

from elm_jax import files
from elm_jax.checkpoints import expert_files, interchange
from elm_jax.expert_stack import ExpertStack, ExpertStackError
from elm_jax.library import paths, records, removal
from elm_jax.library.paths import (EMBEDDINGS_DIR, EXPERT_FILES, EXPERTS_DIR, HISTORY, KEYS_DIR, LOCK,
                                   MANIFEST, STAGED, LibraryError, safe_name)
from elm_jax.library.records import check_keys

__all__ = ["ExpertLibrary", "LibraryError", "check_keys", "safe_name"]


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ExpertLibrary:
  """An expert store rooted at `root` (made when opened with `create=True`, as `library add` does).

  `check_integrity=False` loads expert files without comparing them with the manifest's sha256
  (each load warns); everything else is unchanged."""

  def __init__(self, root: str | os.PathLike, create: bool = False, check_integrity: bool = True):
    self.root = epath.Path(root)
    self.check_integrity = check_integrity
    self._made: list[str] = []  # what `_create` made (local paths), for `discard_if_unused`
    if self.root.exists() and not self.root.is_dir():
      raise LibraryError(f"{self.root}: is a file, not an expert library directory")
    if not self._path(MANIFEST, "read the manifest").exists():
      if not create:
        raise LibraryError(f"{self.root / MANIFEST}: not found; {self.root} is not an expert library "
                           "(create one with `elm-jax library add --library=DIR EXPERT_DIR`)")
      self._create()

  def _create(self) -> None:
    """Makes an empty library at the root (and the directories above it that are missing),
    remembering what it made for `discard_if_unused`; a write that fails (a full disk) leaves
    none of it behind."""
    local = files.is_local(self.root)
    path = os.path.abspath(os.fspath(self.root))
    while local and not os.path.lexists(path):  # the root and the directories above it, outermost first
      self._made.insert(0, path)
      path = os.path.dirname(path)
    if local and not os.path.lexists(os.fspath(self.root / LOCK)):
      self._made.append(os.fspath(self.root / LOCK))
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      with self._lock():
        if not (self.root / MANIFEST).exists():
          self._write_manifest(records.empty_manifest())
          self._made.append(os.fspath(self.root / MANIFEST))
    except (files.FileCheckError, OSError) as e:
      if not os.path.lexists(os.fspath(self.root / MANIFEST)):  # no library: nothing of it is left
        paths.remove_created(self._made)
      line = paths.failure_line(e)
      if line is None:
        raise
      raise LibraryError(f"{line}; the library {self.root} was not created") from None

  def discard_if_unused(self) -> bool:
    """Deletes the library this object created (`create=True` where there was none) while it
    holds nothing but its empty manifest and lock: what a command whose first add failed (a
    full disk) would leave. Returns whether it did."""
    manifest = os.fspath(self.root / MANIFEST)
    if manifest not in self._made:
      return False
    try:
      with self._lock():
        if (sorted(os.listdir(os.fspath(self.root))) != sorted([MANIFEST, LOCK])
            or self.manifest() != records.empty_manifest()):
          return False
        os.unlink(manifest)
    except (LibraryError, files.FileCheckError, OSError):  # in use, or not ours to judge: kept
      return False
    paths.remove_created(self._made)
    return True

  # ------------------------------------------------------------------ paths, manifest and lock
  def _path(self, relative: str, purpose: str) -> epath.Path:
    """`root / relative`, refused when a symbolic link lies on the way (`paths.reach`)."""
    return paths.reach(self.root, relative, purpose)

  def _open_local(self, relative: str, flags: int, purpose: str) -> int:
    return paths.open_nofollow(self.root, relative, flags, purpose)

  def _lock(self) -> contextlib.AbstractContextManager[None]:
    return paths.lock(self.root)

  def manifest(self) -> dict[str, Any]:
    """The manifest, every entry's fields checked (a damaged entry is named, not tripped over),
    with no name given twice and no two entries sharing a directory or a keys file."""
    path = self._path(MANIFEST, "read the manifest")
    return records.check_manifest(records.read_json(path), path)

  def _write_manifest(self, manifest: dict[str, Any]) -> None:
    files.write_atomically(self._path(MANIFEST, "write the manifest"), records.manifest_bytes(manifest))

  def _check_bookkeeping(self) -> None:
    """Refuses, before a writer changes anything, a link at the manifest or the history (each
    write checks again)."""
    self._path(MANIFEST, "write the manifest")
    self._path(HISTORY, "append to the history")

  def _append_history(self, record: dict[str, Any]) -> Callable[[], None]:
    """Appends one line to history.jsonl (called under the lock); returns the call that cuts it
    off again, for a command whose later step fails (on an object store, where a file cannot be
    cut, a call that does nothing). A failed write (a full disk) leaves no part of a local line
    and raises one line naming the file and the bytes it needed."""
    line = (json.dumps({"time": _now(), **record}, sort_keys=True) + "\n").encode()
    if not files.is_local(self.root):
      with (self.root / HISTORY).open("ab") as f:
        f.write(line)
      return lambda: None
    path = os.fspath(self.root / HISTORY)
    existed = os.path.lexists(path)
    fd = self._open_local(HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "append to the history")
    try:
      size = os.fstat(fd).st_size  # under the lock, nobody else appends
      view = memoryview(line)
      try:
        while view:
          view = view[os.write(fd, view):]
      except OSError as e:
        with contextlib.suppress(OSError):
          _cut_history(fd, path, size, existed)  # no part of the line is left
        raise files.write_failure(path, e, len(line)) from None
    finally:
      os.close(fd)

    def cut() -> None:
      fd = self._open_local(HISTORY, os.O_WRONLY, "put the history back")
      try:
        _cut_history(fd, path, size, existed)
      finally:
        os.close(fd)
    return cut

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
    return self._entry(name, self.manifest()["experts"])

  def _entry(self, name: str, experts: dict[str, Any]) -> dict[str, Any]:
    """`entry` from the manifest's `experts` read once by the caller (who looks up many)."""
    if name not in experts:
      raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}; the library holds "
                         f"{len(experts)} expert(s): {', '.join(sorted(experts)[:10])}"
                         f"{' ...' if len(experts) > 10 else ''}")
    pending = removal.pending(self, name, f"look up expert {name!r}")
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
    if not paths.is_directory_name(dirname):
      raise LibraryError(f"{what}: {directory!r} does not name an expert directory ('{EXPERTS_DIR}/NAME', "
                         "NAME as `library add` writes it: letters, digits and -_.@, no leading '.')")
    for file in list(entry["files"]) + ([paths.GATES_FILE] if entry.get("gates_file") else []):
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
    experts = self.manifest()["experts"]
    for name in selection:
      self._entry(name, experts)
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

  def load_stack(self, names: Sequence[str], backbone_fingerprint: Optional[str] = None,
                 pretrained: Optional[Mapping] = None) -> tuple[ExpertStack, list[expert_files.ExpertMetadata]]:
    """(the experts stacked [E, ...] in the order of `names`, their metadata): each file read
    once, checked against the manifest's sha256 as it is read (unless the library was opened
    without checks), and stacked once. Experts of several kinds stack as
    `expert_stack.stack_mixed` does (`pretrained`: the full backbone tree, for the backbone
    parameters only some of them train)."""
    experts = self.manifest()["experts"]
    entries = [self._entry(name, experts) for name in names]
    directories = [os.fspath(self._directory(n, e)) for n, e in zip(names, entries)]
    if not self.check_integrity:
      for name in names:
        files.warn_unchecked(f"expert {name!r}")
    try:
      return ExpertStack.load(names, directories, recorded=[e["files"] for e in entries],
                              backbone_fingerprint=backbone_fingerprint,
                              check_integrity=self.check_integrity, pretrained=pretrained)
    except (files.FileCheckError, ExpertStackError) as e:
      raise LibraryError(str(e)) from None

  # ------------------------------------------------------------------ adds
  def holds_identical(self, name: str, expert_dir: str | os.PathLike) -> bool:
    """Whether `name` is in the library with exactly the files of `expert_dir` (so adding it
    again, as a rerun of an interrupted add does, has nothing to do)."""
    entry = self.manifest()["experts"].get(name)
    return (entry is not None and entry["files"] == records.file_digests(epath.Path(expert_dir))
            and removal.pending(self, name, f"add expert {name!r}") is None)

  def add(self, expert_dir: str | os.PathLike, name: Optional[str] = None,
          keys: Optional[Sequence[dict[str, Any]]] = None,
          provenance: Optional[dict[str, Any]] = None, checkpoint: Optional[str] = None) -> str:
    """Copies a trainer-written expert directory into the library under `name` (default: its
    metadata name) with optional retrieval `keys`; returns the name. The same expert added again
    (same files) is a no-op; another expert under a name already present (or under a name that
    maps to another expert's directory), or one trained on another backbone than the library's,
    is refused. A failed write (a full disk) leaves the library as it was. A PEFT or AdapterHub
    folder is converted for the backbone `checkpoint` (or the library's) and added the same way."""
    if interchange.folder_format(expert_dir) is not None:
      with interchange.converted(expert_dir, checkpoint or self.manifest().get("backbone_checkpoint"),
                                 name) as (converted, meta):
        imported = meta.training_config["imported"]
        return self.add(converted, meta.name, keys, provenance or {
            "source": imported["source"], "imported_from": imported["format"]})
    source = epath.Path(expert_dir)
    metadata = expert_files.check_expert(os.fspath(source))  # parameter list, finite values
    name = name or metadata.name
    dirname = safe_name(name)
    directory = f"{EXPERTS_DIR}/{dirname}"
    digests = records.file_digests(source)
    if keys is not None:
      keys = check_keys(keys, f"retrieval keys of {name!r}")
    purpose = f"add expert {name!r}"
    if removal.trashed(self, purpose):  # an interrupted remove (of this expert, say) is finished first
      with self._lock():
        removal.finish_all(self)
    if self.manifest()["experts"].get(name, {}).get("files") == digests:
      return name
    staged_relative = f"{EXPERTS_DIR}/.{dirname}.{paths.host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    staged = self.root / staged_relative
    not_added = f"expert {name!r} was not added to the library {self.root}"
    made: list[epath.Path] = []
    try:
      made = paths.make_directories(self.root, staged_relative, purpose)  # and experts/ when new
      self._copy_expert(source, staged, directory, digests)
      with self._lock():
        self._clear_leftovers()
        removal.finish_all(self)
        manifest = self.manifest()
        if manifest["experts"].get(name, {}).get("files") == digests:
          return name  # a concurrent add of the same expert landed first
        self._check_new(manifest, name, dirname, metadata)
        self._check_bookkeeping()
        entry = {"directory": directory, "task": metadata.task, "prompt": metadata.prompt,
                 "kind": metadata.expert_config.get("kind"), "steps": metadata.steps, "files": digests,
                 "keys": keys is not None, "added": _now(),
                 "provenance": provenance or {"source": os.fspath(source)}}
        self._enter(manifest, name, entry, staged, keys, metadata, not_added)
    except (files.FileCheckError, OSError) as e:  # a write before `_enter` (which words its own)
      line = paths.failure_line(e)
      if line is None:
        raise
      raise LibraryError(f"{line}; {not_added} (nothing of it is left)") from None
    finally:
      paths.delete(staged)
      paths.remove_created(made)  # experts/, when this add made it and nothing is in it
    return name

  def _copy_expert(self, source: epath.Path, staged: epath.Path, directory: str,
                   digests: dict[str, dict[str, Any]]) -> None:
    """Copies the expert's files into `staged`; a failed write (a full disk) names the file as
    it would be in the library, and its bytes."""
    for file in EXPERT_FILES:
      try:
        (source / file).copy(staged / file)
      except OSError as e:
        if files.describe_write_error(e) is None:
          raise
        raise files.write_failure(self.root / directory / file, e, digests[file]["bytes"]) from None
    if records.file_digests(staged) != digests:
      raise LibraryError(f"{source}: changed while it was being copied into the library; add it again")

  def _enter(self, manifest: dict[str, Any], name: str, entry: dict[str, Any], staged: epath.Path,
             keys: Optional[Sequence[dict[str, Any]]], metadata, not_added: str) -> None:
    """Puts the staged expert in place and records it (called under the lock): its keys
    written, its directory renamed in (or a complete one a killed add left adopted), the
    history appended, then the manifest written, which makes the add done. A step that fails
    puts back what the ones before it did."""
    purpose = f"add expert {name!r}"
    target = self._path(entry["directory"], purpose)
    adopted = target.exists()  # left complete by an add killed before its manifest write
    if adopted and records.file_digests(target) != entry["files"]:
      raise LibraryError(f"{target}: exists, holds another expert's files, and no manifest "
                         "entry names it; move it out of the library (or remove it) and add again")
    undo: list[Callable[[], object]] = []
    try:
      if keys is not None:
        entry["keys_file"], written = self._write_keys(name, keys, purpose)
        undo.append(functools.partial(paths.remove_created, written))
      if not adopted:
        staged.rename(target)
        undo.append(functools.partial(target.rename, staged))
      recorded = [h for h in self.history() if h.get("name") == name][-1:] if adopted else []
      if not (recorded and recorded[0].get("action") == "add" and recorded[0].get("files") == entry["files"]):
        undo.append(self._append_history({"action": "add", "name": name, "files": entry["files"]}))
      manifest["backbone_fingerprint"] = manifest["backbone_fingerprint"] or metadata.backbone_fingerprint
      checkpoint = metadata.training_config.get("backbone_checkpoint")
      manifest["backbone_checkpoint"] = manifest.get("backbone_checkpoint") or checkpoint
      manifest["experts"][name] = entry
      self._write_manifest(manifest)
    except Exception as e:  # a failed write (a full disk): put back, newest first
      raise paths.put_back(undo, e, f"{not_added} (nothing of it is left)",
                           f"{not_added}; what it wrote is left (`elm-jax library verify --library="
                           f"{self.root}` lists it, and adding it again completes the add)") from None

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

  def _write_keys(self, name: str, keys: Sequence[dict[str, Any]], purpose: str
                  ) -> tuple[dict[str, Any], list[epath.Path]]:
    """Writes `name`'s retrieval keys (the same keys, left by an interrupted add, are kept);
    returns their manifest record and what this call made (the directories and the file), for
    `paths.remove_created` when the add fails later."""
    path = self.keys_path(name, purpose)
    data = "".join(json.dumps(k, sort_keys=True, allow_nan=False) + "\n" for k in keys).encode()
    made: list[epath.Path] = []
    if path.exists():
      if path.read_bytes() != data:
        raise LibraryError(f"{path}: retrieval keys for {name!r} already exist (other keys; no manifest "
                           "entry names them) and are never rewritten; move the file out and add again")
    else:
      made = paths.make_directories(self.root, KEYS_DIR, purpose)
      try:
        files.write_atomically(path, data)
      except Exception:
        paths.remove_created(made)
        raise
      made.append(path)
    digest, size = files.digest_file(path)
    return {"sha256": digest, "bytes": size}, made

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
              for name, path in removal.finish_all(self, purpose)]
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
      if STAGED.match(staged.name):
        self._path(f"{EXPERTS_DIR}/{staged.name}", purpose)
        if staged.is_dir() and paths.left_by_a_dead_add(staged.name):
          paths.delete(staged)
          cleared.append(staged)
    return cleared

  def staged_leftovers(self) -> list[epath.Path]:
    """Expert directories being staged, or left half-copied by an interrupted add (links,
    which no add writes, are not among them: `verify` reports those as links)."""
    experts = self.root / EXPERTS_DIR
    if not experts.is_dir():
      return []
    return sorted(p for p in experts.iterdir() if STAGED.match(p.name) and p.is_dir()
                  and not (files.is_local(p) and os.path.islink(os.fspath(p))))

  # ------------------------------------------------------------------ removal
  def remove(self, name: str) -> bool:
    """Deletes an expert, its keys and its cached embeddings (recorded in the history), in
    steps a kill can interrupt at any moment (`removal.py`): a record in
    `.trash/<name>.<id>/`, the files renamed into it, the history appended, the manifest entry
    dropped, the trash deleted. Pending removals (this one's, after a kill) are finished
    first, so running the same remove again completes an interrupted one; a failed write (a
    full disk) before the manifest update leaves the library as it was. Returns False, doing
    nothing, when the expert is gone and the history's last word on it is its removal (a
    rerun of a remove that had finished)."""
    return removal.remove(self, name)

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
      if not paths.is_directory_name(value):
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
  def verify(self, names: Optional[Sequence[str]] = None) -> list[str]:
    """Problems found (empty when every file matches its recorded size and sha256, nothing is
    left over from an interrupted add or remove, and the library holds no symbolic link). A
    pending removal is one line saying how to finish it, not its expert's files one by one."""
    manifest = self.manifest()
    pending, problems = removal.pending_problems(self, names)
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
      if entry.get("gates_file"):
        recorded.append((directory / paths.GATES_FILE, entry["gates_file"]))
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
      problems.extend(paths.links(self.root))
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


def _cut_history(fd: int, path: str, size: int, existed: bool) -> None:
  """Puts history.jsonl back as it was before an append: cut to `size` bytes, or deleted when
  the append made it. A failure to do so is raised (a kill at this moment leaves the same)."""
  if existed:
    os.ftruncate(fd, size)
  else:
    os.unlink(path)
