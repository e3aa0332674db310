"""Removing an expert from an Expert Library so that a kill at any moment, or a write that
fails, leaves the library as it was or with a removal that the next writer finishes.

`remove` writes a record of the removal first (`.trash/<name>.<id>/removal.json`: the manifest
entry being removed), renames the expert's directory, keys and cached embeddings into that
directory, appends the removal to the history, drops the manifest entry (the step that makes
the removal done), and deletes the trash directory last (its record last of all, so the record
stays while anything of the expert is in it).

- A kill leaves the library as it was, or a pending removal: `verify` reports it
  (`pending_problems`), an expert whose removal is pending cannot be loaded (`pending`), and the
  same `remove`, `verify --repair` or the next `add` finishes it (`finish_all`), each step
  skipped when the killed run did it.
- A write of `remove` that fails before the manifest update (a full disk) puts back what the
  steps before it did, newest first (files renamed back, the history line cut off, the record
  and the directories it made deleted), and raises one line naming the file, the expert and the
  library. A recorded removal that fails while being finished stays pending.

On object stores, where a directory cannot be renamed, the files are deleted in place after
the manifest update. Every function takes the `ExpertLibrary` it works on and is called by it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from typing import Any, Callable, Optional, Protocol, Sequence

from etils import epath

from elm_jax import files
from elm_jax.library import paths, records
from elm_jax.library.paths import MANIFEST, REMOVAL_RECORD, TRASH_DIR, TRASHED, LibraryError, safe_name


class ExpertLibrary(Protocol):
  """What removal uses of `store.ExpertLibrary` (which calls it; naming the class itself here
  would make the two modules import each other)."""
  root: epath.Path

  def _path(self, relative: str, purpose: str) -> epath.Path: ...
  def _lock(self) -> contextlib.AbstractContextManager[None]: ...
  def manifest(self) -> dict[str, Any]: ...
  def _write_manifest(self, manifest: dict[str, Any]) -> None: ...
  def _check_bookkeeping(self) -> None: ...
  def _append_history(self, record: dict[str, Any]) -> Callable[[], None]: ...
  def history(self) -> list[dict[str, Any]]: ...
  def _directory(self, name: str, entry: dict[str, Any], purpose: Optional[str] = None) -> epath.Path: ...
  def keys_path(self, name: str, purpose: Optional[str] = None) -> epath.Path: ...
  def _embedding_files(self, name: str, purpose: str) -> list[epath.Path]: ...


def remove(library: ExpertLibrary, name: str) -> bool:
  """`ExpertLibrary.remove`: deletes expert `name`, its keys and cached embeddings in the steps
  above; returns False, doing nothing, when it is gone and the history's last word on it is its
  removal (a rerun of a remove that had finished)."""
  purpose = f"remove expert {name!r}"
  with library._lock():
    finished = [n for n, _ in finish_all(library, purpose)]
    manifest = library.manifest()
    entry = manifest["experts"].get(name)
    if entry is None:
      if name in finished:
        return True
      if [h.get("action") for h in library.history() if h.get("name") == name][-1:] == ["remove"]:
        return False
      raise LibraryError(f"{library.root / MANIFEST}: no expert named {name!r}")
    _moves(library, name, entry, manifest, purpose)  # every path checked before anything is written
    library._check_bookkeeping()
    removal_id = uuid.uuid4().hex
    relative = f"{TRASH_DIR}/{safe_name(name)}.{removal_id}"
    trash = library.root / relative
    record = {"name": name, "id": removal_id, "entry": entry}
    undo: list[Callable[[], object]] = []
    try:
      made = paths.make_directories(library.root, relative, purpose)  # and .trash/ when new
      undo.append(functools.partial(paths.remove_created, made))
      files.write_atomically(trash / REMOVAL_RECORD, json.dumps(record, sort_keys=True).encode())
      undo.append(functools.partial(paths.delete, trash / REMOVAL_RECORD))
      moves = _commit(library, trash, record, recovered=False, undo=undo)
    except Exception as e:  # a failed write (a full disk): put back, newest first
      raise paths.put_back(
          undo, e, f"expert {name!r} was not removed; the library {library.root} is as it was",
          f"the removal of {name!r} is left pending in {trash}: `elm-jax library verify --repair "
          f"--library={library.root}` finishes it") from None
    _clear(trash, moves, local=files.is_local(library.root))
  return True


def _moves(library: ExpertLibrary, name: str, entry: dict[str, Any], manifest: dict[str, Any],
           purpose: str) -> list[tuple[epath.Path, str]]:
  """(path in the library, path in the trash directory) of every file of `name` still in
  place: its directory, keys and cached embeddings, each checked (inside the library, no
  link on the way, not another entry's)."""
  directory = library._directory(name, entry, purpose)
  for other, other_entry in manifest["experts"].items():
    if other != name and (other_entry["directory"] == entry["directory"]
                          or safe_name(other) == safe_name(name)):
      raise LibraryError(f"{library.root / MANIFEST}: experts[{other!r}] uses the directory or keys file "
                         f"of expert {name!r} too; refusing to {purpose}, which would delete them")
  moves = [(directory, "expert"), (library.keys_path(name, purpose), "keys.jsonl")]
  for path in library._embedding_files(name, purpose):
    moves.append((path, f"embeddings/{path.parent.parent.name}/{path.parent.name}.npy"))
  return [(path, dest) for path, dest in moves
          if (os.path.lexists(os.fspath(path)) if files.is_local(path) else path.exists())]


def _commit(library: ExpertLibrary, trash: epath.Path, record: dict[str, Any], recovered: bool,
            undo: Optional[list[Callable[[], object]]] = None) -> list[tuple[epath.Path, str]]:
  """Does the removal `record` describes up to its manifest update (called under the lock),
  each step skipped when an interrupted run did it: the files renamed into `trash` (local
  libraries), the history appended, the manifest entry dropped. Appends to `undo` the call
  that reverses each step, until the manifest update makes the removal done. Returns the
  moves (`_moves`) for `_clear`."""
  name, entry = record["name"], record["entry"]
  purpose = f"finish removing expert {name!r}" if recovered else f"remove expert {name!r}"
  manifest = library.manifest()
  listed = manifest["experts"].get(name)
  if listed is not None and listed["directory"] != entry["directory"]:
    raise LibraryError(f"{trash / REMOVAL_RECORD}: records the removal of {name!r} from "
                       f"{entry['directory']!r}, but the manifest lists it in {listed['directory']!r}; "
                       "move the trash directory out of the library if the expert is to stay")
  moves = _moves(library, name, entry, manifest, purpose)
  undo = [] if undo is None else undo
  if files.is_local(library.root):
    for path, dest in moves:
      target = trash / dest
      if "/" in dest:
        made = paths.make_directories(library.root, f"{TRASH_DIR}/{trash.name}/{dest.rpartition('/')[0]}",
                                      purpose)
        undo.append(functools.partial(paths.remove_created, made))
      if not os.path.lexists(os.fspath(target)):  # else the rename was done; `path` is not the expert's
        os.rename(os.fspath(path), os.fspath(target))
        undo.append(functools.partial(os.rename, os.fspath(target), os.fspath(path)))
  if not recovered or not any(h.get("removal") == record["id"] for h in library.history()):
    undo.append(library._append_history({"action": "remove", "name": name, "files": entry["files"],
                                         "removal": record["id"]}))
  if listed is not None:
    del manifest["experts"][name]
    library._write_manifest(manifest)
  undo.clear()  # done: nothing is put back from here on
  return moves


def _clear(trash: epath.Path, moves: Sequence[tuple[epath.Path, str]], local: bool) -> None:
  """Deletes what a done removal left: on object stores its files in place; then `trash`,
  its record last, and `.trash/` once empty."""
  for path, _ in ([] if local else moves):
    paths.delete(path)
  for child in sorted(trash.iterdir()):
    if child.name != REMOVAL_RECORD:
      paths.delete(child)
  paths.delete(trash / REMOVAL_RECORD)
  paths.delete(trash)
  with contextlib.suppress(OSError):  # still holds another removal's trash: kept
    trash.parent.rmdir()


def trashed(library: ExpertLibrary, purpose: str) -> list[epath.Path]:
  """The directories in `.trash/`: removals interrupted (or, without the lock, running)."""
  trash = library._path(TRASH_DIR, purpose)
  if not trash.is_dir():
    return []
  found = sorted(trash.iterdir())
  for path in found:
    library._path(f"{TRASH_DIR}/{path.name}", purpose)
  return found


def record_of(library: ExpertLibrary, trash: epath.Path) -> Optional[dict[str, Any]]:
  """The record of a removal in `trash`, checked; None when it has none (a removal killed
  before its record was written, or after it was deleted: nothing of an expert is there)."""
  path = library._path(f"{TRASH_DIR}/{trash.name}/{REMOVAL_RECORD}", "read a removal record")
  if not path.exists():
    return None
  record = records.read_json(path)
  match = TRASHED.match(trash.name)
  if not (isinstance(record, dict) and isinstance(record.get("name"), str) and match
          and isinstance(record.get("id"), str) and record["id"] == match["id"]):
    raise LibraryError(f"{path}: expected a removal record {{name, id, entry}} whose id ends the "
                       f"directory name {trash.name!r}; got {str(record)[:200]}")
  records.check_entry(record["name"], record.get("entry"), str(path))
  if safe_name(record["name"]) != match["dirname"]:
    raise LibraryError(f"{path}: records the removal of {record['name']!r}, whose directory name is "
                       f"not {match['dirname']!r}")
  return record


def pending(library: ExpertLibrary, name: str, purpose: str) -> Optional[epath.Path]:
  """The trash directory of a recorded, unfinished removal of `name`, if there is one."""
  dirname = safe_name(name)
  for trash in trashed(library, purpose):
    match = TRASHED.match(trash.name)
    if match and match["dirname"] == dirname and (trash / REMOVAL_RECORD).exists():
      return trash
  return None


def finish_all(library: ExpertLibrary, purpose: str = "finish an interrupted `library remove`"
               ) -> list[tuple[Optional[str], epath.Path]]:
  """Finishes every recorded removal in `.trash/` and deletes what holds no record (called
  under the lock, so no removal is running); returns (name or None, trash directory)."""
  done = []
  for trash in trashed(library, purpose):
    record = record_of(library, trash) if trash.is_dir() else None
    if record is None:
      paths.delete(trash)
    else:
      _clear(trash, _commit(library, trash, record, recovered=True), files.is_local(library.root))
    done.append((record and record["name"], trash))
  with contextlib.suppress(OSError):  # an empty .trash left by a kill after the last removal
    if (library.root / TRASH_DIR).is_dir():
      (library.root / TRASH_DIR).rmdir()
  return done


def pending_problems(library: ExpertLibrary, names: Optional[Sequence[str]]) -> tuple[set[str], list[str]]:
  """(names whose removal is pending, one line per removal left in `.trash/`: of `names`, or
  of every expert when `names` is empty), each saying how to finish it."""
  names_pending, problems = set(), []
  finish = (f"run `elm-jax library verify --repair --library={library.root}` (or the same "
            "`library remove` again) to finish it")
  try:
    found = trashed(library, "verify the library")
  except LibraryError as e:
    return names_pending, [str(e)]
  for path in found:
    try:
      record = record_of(library, path) if path.is_dir() else None
    except LibraryError as e:
      problems.append(f"{e}; {finish}")
      continue
    if record is None:
      if not names:
        problems.append(f"{path}: left by an interrupted `library remove` (no record, so nothing of "
                        f"an expert is in it); `elm-jax library verify --repair --library={library.root}` "
                        "deletes it")
    elif not names or record["name"] in names:
      names_pending.add(record["name"])
      problems.append(f"{path}: an interrupted `library remove` of {record['name']!r} "
                      f"({_count_files(path) - 1} of its files are here); {finish}")
  return names_pending, problems


def _count_files(path: epath.Path) -> int:
  if not files.is_local(path):
    return sum(1 for p in path.rglob("*") if p.is_file())
  return sum(len(names) for _, _, names in os.walk(os.fspath(path)))
