"""Where each file of an Expert Library lives, how it is reached (never through a symbolic
link), and how a writer that fails puts back what it made.

    <library>/manifest.json            names, metadata, content hashes, the backbone fingerprint
    <library>/history.jsonl            one line per add / remove, never rewritten
    <library>/experts/<name>/          tensors.safetensors + expert.json, as the trainer wrote them
    <library>/experts/<name>/gates.safetensors       its PHATGOOSE gates, when trained (`gates.py`)
    <library>/experts/.<name>.<host>.<pid>.<hex>.tmp/   an expert being copied in by an add
    <library>/retrieval/keys/<name>.jsonl            training instances used as retrieval keys
    <library>/retrieval/embeddings/<embedder>/<format>/<name>.npy   their embeddings (a cache)
    <library>/.lock                    the writers' lock
    <library>/.trash/<name>.<id>/      an expert being removed, with its record (removal.json)

`<name>` is `safe_name(name)` (`expert_files.directory_name`); two experts whose names map to
one directory name are refused.

No symbolic links. A library lives on shared disks and buckets, so a link planted in it must not
become a way out: a library holds no symbolic link below its root (elm_jax never writes one),
and every operation refuses, naming the link, to go through one, wherever it is (`experts/`,
an expert's directory or files, `retrieval/`, the keys and embedding directories and files,
`manifest.json`, `history.jsonl`, `.lock`, `.trash/`), even one that points inside the library.
The root itself may be a link. Every path is reached through `reach`, which checks each
component below the root; `links` lists every link for `verify`. (The check is made just
before each use; the lock and the history are also opened with O_NOFOLLOW, `open_nofollow`. A
process that plants a link between the check and the use, racing the command, is not guarded
against.)

A write that fails (a full disk) leaves nothing new behind: `make_directories` returns the
directories it made and `remove_created` deletes them (once empty) with the files a writer
made; `put_back` runs a failed writer's undo steps, newest first, and words the error as one
line saying what is left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
from typing import Callable, Iterator, Optional, Sequence

from etils import epath

from elm_jax import files
from elm_jax.checkpoints import expert_files
from elm_jax.errors import UserInputError

MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
EXPERTS_DIR = "experts"
KEYS_DIR = "retrieval/keys"
EMBEDDINGS_DIR = "retrieval/embeddings"
LOCK = ".lock"
TRASH_DIR = ".trash"
REMOVAL_RECORD = "removal.json"
EXPERT_FILES = (expert_files.TENSORS_FILE, expert_files.METADATA_FILE)
GATES_FILE = "gates.safetensors"  # beside them, recorded in the entry's `gates_file` (library/gates.py)
# A staged expert directory: experts/.<directory name>.<host>.<pid>.<hex>.tmp
STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[\w-]*)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp$")
# An expert being removed: .trash/<directory name>.<hex id>/
TRASHED = re.compile(r"^(?P<dirname>.+)\.(?P<id>[0-9a-f]{32})$")


class LibraryError(UserInputError):
  """A malformed library, an unknown or duplicate expert, or files that fail verification."""


def safe_name(name: str) -> str:
  """The file-system name of an expert (`expert_files.directory_name`)."""
  try:
    return expert_files.directory_name(name)
  except expert_files.ExpertFileError as e:
    raise LibraryError(str(e)) from None


def is_directory_name(name: str) -> bool:
  try:
    return expert_files.directory_name(name) == name
  except expert_files.ExpertFileError:
    return False


def host() -> str:
  """This machine's name as a staged directory records it (letters, digits, '-' and '_')."""
  return re.sub(r"[^\w-]", "-", socket.gethostname())[:40]


def left_by_a_dead_add(name: str) -> bool:
  """Whether `name` is a staged directory (`STAGED`) made by an add on this host whose
  process is gone (so no add is still filling it)."""
  match = STAGED.match(name)
  if match is None or match["host"] != host():
    return False
  try:
    os.kill(int(match["pid"]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, under another user
    return False
  return False


# ---------------------------------------------------------------------------- links
def link_description(root: epath.Path, link: str) -> str:
  """"LINK: is a symbolic link ..." saying where it resolves, inside or outside the library."""
  real, real_root = os.path.realpath(link), os.path.realpath(os.fspath(root))
  if real != real_root and os.path.commonpath([real_root, real]) == real_root:
    return f"{link}: is a symbolic link to {real} inside the library"
  return f"{link}: is a symbolic link that resolves to {real}, outside the library {root}"


def link_error(root: epath.Path, link: str, purpose: str) -> LibraryError:
  """The one-line refusal to `purpose` through the symbolic link `link` inside the library."""
  return LibraryError(f"{link_description(root, link)}; refusing to {purpose} through it (a library "
                      "holds no symbolic links)")


def reach(root: epath.Path, relative: str, purpose: str) -> epath.Path:
  """`root / relative` ('/'-separated), refused (naming the link and `purpose`, e.g. "remove
  expert 'x'") when it or any directory between it and the root is a symbolic link."""
  if files.is_local(root):
    current = os.fspath(root)
    for part in relative.split("/"):
      current = os.path.join(current, part)
      if os.path.islink(current):
        raise link_error(root, current, purpose)
      if not os.path.exists(current):
        break
  return root / relative


def open_nofollow(root: epath.Path, relative: str, flags: int, purpose: str) -> int:
  """A descriptor of a file of the library opened without following a link (O_NOFOLLOW), so
  a link planted after `reach` checked it is refused too."""
  path = os.fspath(reach(root, relative, purpose))
  try:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise link_error(root, path, purpose) from None
    if e.errno in files.WRITE_ERRNOS:
      raise files.write_failure(path, e, kept=f"needed to {purpose}") from None
    raise LibraryError(f"{path}: cannot be opened to {purpose} ({e.strerror or e})") from None


@contextlib.contextmanager
def lock(root: epath.Path) -> Iterator[None]:
  """The writers' lock (`fcntl.flock` of `.lock`, made when missing); none on object stores."""
  if not files.is_local(root):
    yield
    return
  fd = open_nofollow(root, LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "take the library's lock")
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def links(root: epath.Path) -> list[str]:
  """One line per symbolic link anywhere below the root (none is followed)."""
  if not files.is_local(root):
    return []
  out = []
  for base, dirs, names in os.walk(os.fspath(root)):
    for name in sorted(dirs + names):
      path = os.path.join(base, name)
      if os.path.islink(path):
        out.append(f"{link_description(root, path)} (a library holds no symbolic links and "
                   "every command refuses to go through one: replace it by what it points to, or "
                   "delete it)")
  return out


# ---------------------------------------------------------------------------- making and deleting
def delete(path: str | os.PathLike) -> None:
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


def make_directories(root: epath.Path, relative: str, purpose: str) -> list[epath.Path]:
  """Makes `root/relative` and every missing directory between it and the root, each reached
  by `reach` (no link on the way); returns the ones it made, outermost first, for
  `remove_created`. One that cannot be made (a full disk) raises one line naming it, the
  ones made before it removed. (On object stores, which have no directories to leave
  behind, returns [].)"""
  if not files.is_local(root):
    reach(root, relative, purpose).mkdir(parents=True, exist_ok=True)
    return []
  made: list[epath.Path] = []
  parts = relative.split("/")
  for end in range(1, len(parts) + 1):
    path = reach(root, "/".join(parts[:end]), purpose)
    try:
      os.mkdir(os.fspath(path))
    except FileExistsError:
      continue
    except OSError as e:
      remove_created(made)
      raise files.write_failure(path, e) from None
    made.append(path)
  return made


def remove_created(created: Sequence[str | os.PathLike]) -> None:
  """Deletes what a failed writer made, newest first: its files, and its directories once
  empty (one that another writer has put something in since is kept). Local paths."""
  for path in reversed(created):
    local = os.fspath(path)
    with contextlib.suppress(OSError):
      if os.path.isdir(local) and not os.path.islink(local):
        os.rmdir(local)
      elif os.path.lexists(local):
        os.unlink(local)


def failure_line(error: BaseException) -> Optional[str]:
  """One line for an error a writer let through: a refusal or failed write (`UserInputError`)
  as it is worded, an `OSError` naming its file; None for anything else (a bug)."""
  if isinstance(error, UserInputError):
    return str(error)
  if isinstance(error, OSError):
    described = files.describe_write_error(error)
    if described is not None:
      return described
    if error.filename is not None:
      return f"{os.fsdecode(error.filename)}: {error.strerror or error}"
  return None


def put_back(undo: Sequence[Callable[[], object]], error: Exception, undone: str,
             left: str) -> Exception:
  """Runs `undo` (the calls that reverse what a failed writer did, in the order it did it)
  newest first, and returns the error to raise for `error`: its line ending with `undone`
  ("expert 'x' was not added ...") when everything was put back, or with `left` (what is left
  and how to finish it) when a step of the undo failed too. An error that is neither a
  refusal nor an `OSError` (a bug) is returned as it is once everything was put back."""
  try:
    for step in reversed(undo):
      step()
  except Exception as undo_error:  # stop: what is left is what a kill at this moment leaves
    return LibraryError(f"{failure_line(error) or repr(error)}; {left} (putting it back failed: "
                        f"{failure_line(undo_error) or repr(undo_error)})")
  line = failure_line(error)
  return error if line is None else LibraryError(f"{line}; {undone}")
