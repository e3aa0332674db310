"""How elm_jax touches files: every write atomic, every path kept inside the directory it
belongs to, every recorded content hash checked (once per file per process), every user-given
input and output path checked before any work, every failed write one line naming the file.

- `write_atomically` / `atomic_directory`: a file or a directory is built under a temporary
  sibling name and renamed into place, so a reader (or a rerun after kill -9) sees the old
  version or the new one, never half of one. A replaced directory is moved aside first and
  deleted only once the new one is in place.
- `write_output`: a command's output file (`--output`). A regular file is written atomically; a
  character device or a FIFO (`/dev/null`, `/dev/full`, a named pipe) and a stream of this
  process (`/dev/stdout`, `/dev/fd/N`) are written in place: a device node is never replaced.
- A write that fails (a full disk, a quota, a read-only file system, no permission) raises one
  `FileCheckError` naming the file and, for a full disk, the bytes it needed; the old file (or
  directory) is kept and no temporary file is left behind. `write_failure` makes that error for
  any other writer; `describe_write_error` words the same for an `OSError` that a write outside
  these helpers let through (the CLI prints it).
- `inside`: a relative path read from a data file (a manifest's `directory`, say) joined to its
  root, refused when it is absolute, climbs out with `..`, or resolves (through symlinks)
  outside the root. Nothing a library holds can make us read or delete outside it.
- `read_verified`: a file's bytes, read once, hashed and compared with the recorded digest and
  size before anyone parses them.
- `check_input_file`, `check_output_file`, `check_output_dir`: refusals before any work, naming
  the flag: a missing or unreadable input, an output that is a directory, a block device or a
  socket, lies in a missing directory, is one of the inputs, or lies inside a directory the
  command reads (an expert library, a checkpoint: `directories_read`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from typing import Iterator, Optional, Sequence

from etils import epath

from elm_jax.errors import UserInputError

BLOCK = 1 << 20  # bytes hashed per read


class FileCheckError(UserInputError):
  """A path that is refused (outside its root, a directory, missing, unreadable) or a file
  whose content does not match its recorded hash, or a write that failed (a full disk)."""


def is_local(path: str | os.PathLike) -> bool:
  return "://" not in os.fspath(path)


# ---------------------------------------------------------------------------- write failures
# Errors that can only come from writing: a directory being filled reports these (and no
# other error of its caller's, which may be reading an input) as a failed write.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno_of(error: BaseException) -> Optional[int]:
  """The errno of an `OSError`, or of the OS error that a library written in Rust
  (safetensors) reports only in its message ("... No space left on device (os error 28)")."""
  if isinstance(error, OSError):
    return error.errno
  match = _RUST_OS_ERROR.search(str(error))
  return int(match.group(1)) if match else None


def size_text(num_bytes: int) -> str:
  """`num_bytes` for a message: '812 bytes', '1.2 MB' (powers of 1000)."""
  if num_bytes < 1000:
    return f"{num_bytes} byte{'' if num_bytes == 1 else 's'}"
  value = float(num_bytes)
  for unit in ("kB", "MB", "GB", "TB"):
    value /= 1000
    if value < 1000:
      break
  return f"{value:.1f} {unit}"


def _failure(code: Optional[int], strerror: str, size: Optional[int]) -> str:
  """What went wrong, for a message that goes on with the file's name before it."""
  needed = f" writing {size_text(size)}" if size is not None else ""
  if code == errno.ENOSPC:
    return f"no space left on device{needed}"
  if code == errno.EDQUOT:
    return f"disk quota exceeded{needed}"
  return f"cannot be written ({strerror})"


def write_failure(path, error: BaseException, size: Optional[int] = None,
                  kept: Optional[str] = None) -> FileCheckError:
  """The one-line error to raise for a write of `size` bytes to `path` that failed with
  `error` (an `OSError`, or an error carrying "(os error N)"); `kept` says what is left as it
  was ("the old file is kept"). For writers outside these helpers:
  `except OSError as e: raise files.write_failure(path, e, len(data)) from None`."""
  code = _errno_of(error)
  strerror = (error.strerror if isinstance(error, OSError) else None) or (
      os.strerror(code) if code else str(error))
  return FileCheckError(f"{path}: {_failure(code, strerror, size)}" + (f"; {kept}" if kept else ""))


def _kept(path) -> Optional[str]:
  """What a failed write of `path` left as it was (local paths)."""
  path = os.fspath(path)
  if not is_local(path):
    return None
  return "the old file is kept" if os.path.lexists(path) else "nothing was written"


def describe_write_error(error: BaseException) -> Optional[str]:
  """One line for an `OSError` that only a write raises (a full disk, a quota, a read-only
  file system), naming the file written (a copy's destination) and, for a copy, the bytes it
  needed; None for any other error."""
  if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
    return None
  target = error.filename2 or error.filename
  size = None
  if error.filename2 and isinstance(error.filename, str) and os.path.isfile(error.filename):
    size = os.path.getsize(error.filename)  # the source of a copy
  where = os.fsdecode(target) if target is not None else "a file being written (the system named none)"
  return f"{where}: {_failure(error.errno, error.strerror or str(error), size)}"


# ---------------------------------------------------------------------------- atomic writes
def write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary sibling of `path` (any etils path), then renames it over
  `path`; the temporary file never outlives the call. A failed write raises `FileCheckError`
  naming `path` (and, for a full disk, the bytes needed); `path` is then as it was."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except OSError as e:
    raise write_failure(path, e, len(data), _kept(path)) from None
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory to fill; when the block ends without an error it
  becomes `path` (a local path). An existing `path` is an error unless `replace`; then it is
  moved aside, the new directory renamed in, and the old one deleted. On an error the
  temporary directory is removed and `path` is as it was; a full disk (or a quota, or a
  read-only file system) while it is filled raises `FileCheckError` naming the file."""
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not replace:
    raise FileCheckError(f"{path}: already exists")
  parent = os.path.dirname(path)
  kept = "the old directory is kept" if os.path.lexists(path) else "nothing was written"
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  except OSError as e:
    raise write_failure(path, e, kept=kept) from None
  try:
    yield tmp
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    _move_into_place(tmp, path)
  except BaseException as e:
    failure = None
    if not isinstance(e, UserInputError) and _errno_of(e) in WRITE_ERRNOS:
      written = _tree_bytes(tmp)
      file = getattr(e, "filename", None)
      file = os.fsdecode(file) if file is not None else None
      where = path + file[len(tmp):] if file and file.startswith(tmp + os.sep) else path
      removed = f" (the {size_text(written)} written before it failed are removed)" if written else ""
      failure = write_failure(where, e, kept=kept + removed)
    shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
      raise failure from None
    raise


def _tree_bytes(directory: str) -> int:
  """The bytes of the files under `directory` (what a failed write got on disk)."""
  total = 0
  for base, _, names in os.walk(directory):
    for name in names:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(base, name)).st_size
  return total


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


# ---------------------------------------------------------------------------- command outputs
_STREAMS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _own_descriptor(path: str) -> Optional[int]:
  """The file descriptor `path` names when it is a stream of this process (`/dev/stdout`,
  `/dev/fd/N`, `/proc/self/fd/N`), else None."""
  path = os.path.abspath(path)
  if path in _STREAMS:
    return _STREAMS[path]
  for prefix in ("/dev/fd/", "/proc/self/fd/", f"/proc/{os.getpid()}/fd/"):
    if path.startswith(prefix) and path[len(prefix):].isdigit():
      return int(path[len(prefix):])
  return None


def _special_kind(mode: int) -> Optional[str]:
  """What a file of `mode` is when it is not a regular file or a directory."""
  for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"),
                     (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
    if test(mode):
      return kind
  return None


def _existing_kind(path: str) -> Optional[str]:
  """`_special_kind` of what `path` names (through symlinks); None when it is missing."""
  try:
    return _special_kind(os.stat(path).st_mode)
  except OSError:
    return None


_WRITTEN_IN_PLACE = ("character device", "FIFO")


def write_output(path: str | os.PathLike, data: bytes) -> None:
  """Writes a command's output file: a character device, a FIFO or a stream of this process
  (`/dev/null`, a named pipe, `/dev/stdout`) in place, since they must never be replaced;
  anything else atomically (`write_atomically`). Failures raise `FileCheckError` naming
  `path` (`/dev/full`: no space left on device)."""
  if not is_local(path):
    write_atomically(path, data)
    return
  path = os.fspath(path)
  descriptor = _own_descriptor(path)
  if descriptor is not None:
    for stream in (sys.stdout, sys.stderr):  # what was printed before comes first
      stream.flush()
    _write_all(path, descriptor, data)
    return
  kind = _existing_kind(path)
  if kind not in _WRITTEN_IN_PLACE:
    if kind is not None:
      raise FileCheckError(f"{path}: is a {kind}; expected a file name to write")
    write_atomically(path, data)
    return
  try:  # not O_CREAT or O_TRUNC: what is opened is checked to be a device or FIFO before a write
    descriptor = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    raise write_failure(path, e, len(data)) from None
  try:
    opened = _special_kind(os.fstat(descriptor).st_mode)
    if opened not in _WRITTEN_IN_PLACE:  # replaced since it was looked at
      raise FileCheckError(f"{path}: changed from a {kind} to a {opened or 'regular file'} while "
                           "it was opened; not writing it")
    _write_all(path, descriptor, data)
  finally:
    os.close(descriptor)


def _write_all(path: str, descriptor: int, data: bytes) -> None:
  view = memoryview(data)
  try:
    while view:
      view = view[os.write(descriptor, view):]
  except BrokenPipeError:
    raise  # the reader went away: the CLI stops quietly, as a Unix tool does
  except OSError as e:
    raise write_failure(path, e, len(data)) from None


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


def check_output_file(path: str, flag: str = "", inputs: Sequence[Optional[str]] = (),
                      within: Sequence[tuple[Optional[str], str]] = ()) -> None:
  """Refuses, before any work (local paths): an output path that is a directory, a block
  device or a socket, lies in a missing or unwritable directory, names the same file as one of
  `inputs`, or lies inside one of the directories `within` ((directory, what) pairs, e.g.
  `directories_read(...)`) that the command reads. A character device, a FIFO or a stream of
  this process (`/dev/null`, `/dev/stdout`) is accepted when writable: `write_output` writes
  it in place."""
  if not is_local(path):
    return
  label = _label(path, flag)
  if _own_descriptor(path) is not None:
    return
  kind = _existing_kind(path)
  if kind in _WRITTEN_IN_PLACE:
    if not os.access(path, os.W_OK):
      raise FileCheckError(f"{label}: the {kind} is not writable")
    return
  if kind is not None:
    raise FileCheckError(f"{label}: is a {kind}; expected a file name to write")
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
  _check_not_within(path, label, within)


def check_output_dir(path: str, flag: str = "",
                     within: Sequence[tuple[Optional[str], str]] = ()) -> None:
  """Refuses an output directory path that names an existing file, or that lies inside one of
  the directories `within` that the command reads (local paths)."""
  if not is_local(path):
    return
  if os.path.lexists(path) and not os.path.isdir(path):
    raise FileCheckError(f"{_label(path, flag)}: exists and is not a directory")
  _check_not_within(path, _label(path, flag), within)


def _check_not_within(path: str, label: str, within: Sequence[tuple[Optional[str], str]]) -> None:
  real = os.path.realpath(path)
  for directory, what in within:
    if not directory or not is_local(directory) or not os.path.isdir(directory):
      continue
    root = os.path.realpath(directory)
    if os.path.commonpath([root, real]) == root:
      raise FileCheckError(f"{label}: is inside {what} {directory}, which this command reads; "
                           "write the results elsewhere")


def directories_read(library: Optional[str] = None, checkpoint: Optional[str] = None
                     ) -> list[tuple[str, str]]:
  """(directory, what) for the expert library and the backbone checkpoint a command reads:
  `checkpoint`, else the one `library`'s manifest.json records. An output inside one of them is
  refused (`check_output_file(within=...)`); a manifest that cannot be read names no backbone
  here and is reported when the library is opened."""
  out = []
  if library and is_local(library):
    out.append((library, "the expert library"))
    if not checkpoint:
      try:
        with open(os.path.join(library, "manifest.json"), "rb") as f:
          recorded = json.loads(f.read().decode("utf-8")).get("backbone_checkpoint")
      except (OSError, ValueError, AttributeError):
        recorded = None
      if isinstance(recorded, str) and recorded:
        out.append((_checkpoint_directory(recorded), "the library's backbone checkpoint"))
  if checkpoint and is_local(checkpoint):
    out.append((_checkpoint_directory(checkpoint), "the checkpoint"))
  return out


def _checkpoint_directory(path: str) -> str:
  """A checkpoint's directory (a T5X checkpoint may be named by its msgpack file)."""
  return os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path


def read_json_object(path: str, error: type[Exception] = UserInputError) -> dict:
  """The JSON object in the file `path`; `error`, naming the file, when it cannot be read, is not
  UTF-8 JSON or holds something else than an object."""
  try:
    with open(path, "rb") as f:
      raw = json.loads(f.read().decode("utf-8"))
  except OSError as e:
    raise error(f"{path}: cannot be read ({e.strerror or e})") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise error(f"{path}: expected a JSON object, found {type(raw).__name__}")
  return raw
