"""How elm_jax touches files: every write atomic, every path kept inside the directory it
belongs to, every recorded content hash checked (once per file per process), every user-given
input and output path checked before any work.

- `write_atomically` / `atomic_directory`: a file or a directory is built under a temporary
  sibling name and renamed into place, so a reader (or a rerun after kill -9) sees the old
  version or the new one, never half of one. A replaced directory is moved aside first and
  deleted only once the new one is in place.
- `inside`: a relative path read from a data file (a manifest's `directory`, say) joined to its
  root, refused when it is absolute, climbs out with `..`, or resolves (through symlinks)
  outside the root. Nothing a library holds can make us read or delete outside it.
- `read_verified`: a file's bytes, read once, hashed and compared with the recorded digest and
  size before anyone parses them.
- `check_input_file`, `check_output_file`, `check_output_dir`: refusals before any work, naming
  the flag: a missing or unreadable input, an output that is a directory, lies in a missing
  directory, or is one of the inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from typing import Iterator, Optional, Sequence

from etils import epath

from elm_jax.errors import UserInputError

BLOCK = 1 << 20  # bytes hashed per read


class FileCheckError(UserInputError):
  """A path that is refused (outside its root, a directory, missing, unreadable) or a file
  whose content does not match its recorded hash."""


def is_local(path: str | os.PathLike) -> bool:
  return "://" not in os.fspath(path)


# ---------------------------------------------------------------------------- atomic writes
def write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary sibling of `path` (any etils path), then renames it over
  `path`; the temporary file never outlives the call."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory to fill; when the block ends without an error it
  becomes `path` (a local path). An existing `path` is an error unless `replace`; then it is
  moved aside, the new directory renamed in, and the old one deleted. On an error the
  temporary directory is removed and `path` is as it was."""
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not replace:
    raise FileCheckError(f"{path}: already exists")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    _move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, path: str) -> None:
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
  old = os.path.join(trash, "previous")
  os.rename(path, old)
  try:
    os.rename(tmp, path)
  except OSError:
    os.rename(old, path)
    raise
  shutil.rmtree(trash)


# ---------------------------------------------------------------------------- containment
def inside(root: str | os.PathLike, relative: str, what: str) -> epath.Path:
  """`root / relative`, refused (naming `what`, e.g. "manifest.json: experts.x.directory")
  unless `relative` is a relative path without `..` that, with symlinks resolved on a local
  file system, stays strictly inside `root`."""
  if not isinstance(relative, str) or not relative:
    raise FileCheckError(f"{what}: expected a non-empty relative path, got {relative!r}")
  parts = relative.replace("\\", "/").split("/")
  if relative.startswith(("/", "\\")) or "://" in relative or ".." in parts or (
      len(relative) > 1 and relative[1] == ":"):
    raise FileCheckError(f"{what}: {relative!r} leaves the directory it belongs to ({root}); "
                         "expected a path inside it")
  path = epath.Path(root) / relative
  if is_local(root):
    real_root = os.path.realpath(os.fspath(root))
    real = os.path.realpath(os.fspath(path))
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
      raise FileCheckError(f"{what}: {relative!r} resolves to {real}, outside {real_root}")
  return path


# ---------------------------------------------------------------------------- hashes
def digest_file(path: str | os.PathLike) -> tuple[str, int]:
  """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
  digest, size = hashlib.sha256(), 0
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(BLOCK), b""):
      digest.update(block)
      size += len(block)
  return digest.hexdigest(), size


# (real path, size, mtime_ns) -> sha256 of the files this process has already checked.
_verified: dict[tuple[str, int, int], str] = {}


def _identity(path: epath.Path) -> Optional[tuple[str, int, int]]:
  if not is_local(path):
    return None
  stat = os.stat(os.fspath(path))
  return os.path.realpath(os.fspath(path)), stat.st_size, stat.st_mtime_ns


def read_verified(path: str | os.PathLike, sha256: Optional[str], size: Optional[int],
                  what: str, *, check: bool = True) -> bytes:
  """The bytes of `path`, after checking them against the recorded `sha256` and `size`.

  The file is read once into the buffer that is returned and hashed block by block from it; a
  local file that this process has checked before (same size and modification time) is not
  hashed again. A mismatch
  raises `FileCheckError` naming `what` (e.g. "expert 'x'") and the file. With `check=False`
  the bytes are returned unchecked (the caller warns)."""
  path = epath.Path(path)
  if not check or sha256 is None:
    return path.read_bytes()
  key = _identity(path)
  if key is not None and _verified.get(key) == sha256:
    return path.read_bytes()
  data = path.read_bytes()  # one buffer, which the caller parses: no copy of it is made
  digest, view = hashlib.sha256(), memoryview(data)
  for start in range(0, len(data), BLOCK):
    digest.update(view[start:start + BLOCK])
  if size is not None and len(data) != size:
    raise FileCheckError(f"{path}: {what}: {len(data)} bytes, but the manifest records {size} "
                         "(truncated or replaced); `elm-jax library verify` lists every damaged "
                         "file, or pass --skip_integrity_check to load it anyway")
  if digest.hexdigest() != sha256:
    raise FileCheckError(f"{path}: {what}: sha256 {digest.hexdigest()[:12]}... does not match the "
                         f"manifest's {sha256[:12]}... (the file changed after it was added); "
                         "`elm-jax library verify` lists every damaged file, or pass "
                         "--skip_integrity_check to load it anyway")
  if key is not None:
    _verified[key] = sha256
  return data


def warn_unchecked(what: str) -> None:
  print(f"warning: {what}: loaded without checking sha256 (--skip_integrity_check)",
        file=sys.stderr)


# ---------------------------------------------------------------------------- user paths
def _label(path: str, flag: str) -> str:
  return f"{flag}={path}" if flag else path


def check_input_file(path: str, flag: str = "", what: str = "input file") -> None:
  """Refuses a missing input, a directory, or a file this process cannot read; errors start
  with `flag=path` (or the path alone)."""
  label = _label(path, flag)
  if not os.path.lexists(path):
    raise FileCheckError(f"{label}: {what} not found")
  if os.path.isdir(path):
    raise FileCheckError(f"{label}: is a directory; expected a file")
  if not os.path.exists(path):
    raise FileCheckError(f"{label}: a broken symbolic link")
  try:
    with open(path, "rb") as f:
      f.read(0)
  except OSError as e:
    raise FileCheckError(f"{label}: cannot be read ({e.strerror or e})") from None


def check_output_file(path: str, flag: str = "", inputs: Sequence[Optional[str]] = ()) -> None:
  """Refuses an output path that is a directory, lies in a missing directory (local paths), or
  names the same file as one of `inputs`: before any work, so nothing is lost."""
  if not is_local(path):
    return
  label = _label(path, flag)
  if os.path.isdir(path):
    raise FileCheckError(f"{label}: is a directory; expected a file name to write")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileCheckError(f"{label}: the directory {directory} does not exist")
  if not os.access(directory, os.W_OK):
    raise FileCheckError(f"{label}: the directory {directory} is not writable")
  for source in inputs:
    if source and is_local(source) and os.path.exists(source) and (
        os.path.realpath(source) == os.path.realpath(path)
        or (os.path.exists(path) and os.path.samefile(source, path))):
      raise FileCheckError(f"{label}: is also an input ({source}); writing it would "
                           "replace the input: choose another output file")


def check_output_dir(path: str, flag: str = "") -> None:
  """Refuses an output directory path that names an existing file (local paths)."""
  if is_local(path) and os.path.lexists(path) and not os.path.isdir(path):
    raise FileCheckError(f"{_label(path, flag)}: exists and is not a directory")
