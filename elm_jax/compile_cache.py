"""JAX's persistent compilation cache, on for every elm-jax command and the test suite, with
every entry checked before it is run.

A compiled XLA program is written to disk keyed by the program and the backend, and a later
process that needs the same program loads it instead of compiling it again: the demo's and the
tests' second runs, every `score` of the same task shapes, and the scorer's finer length
buckets (`batching.cost_bucket`) cost their compilations once per machine. The directory is
`$ELM_JAX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/elm_jax/jax` (`~/.cache/elm_jax/jax`);
`ELM_JAX_COMPILATION_CACHE=off` turns it off. Any path `jax` can write works (`gs://` included).

JAX itself trusts what it finds under a key's file name: a file renamed or copied over another
program's entry is run as that program (with the other program's results, or a traceback when
the arguments differ), and a truncated entry is reported as a warning on every run. So each
entry is stored as `CheckedCache` writes it: the key it was compiled for and a sha256 of key
and executable before the executable. An entry read under another key, damaged, or unreadable
is a miss, reported in one `warning:` line, deleted, and compiled again (and written again
when it takes long enough to compile). The checksum catches accidents (a swap, a copy, a
truncation, a full disk), not an attacker who can write the cache directory: JAX's own rule
holds, that whoever can write the cache can run code in the processes that read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from typing import Any, Optional

ENV = "ELM_JAX_COMPILATION_CACHE"
# Programs that compile faster than this are not written (reading one back costs about as much).
MIN_COMPILE_SECONDS = 0.25

MAGIC = b"elm_jax compiled program v1\n"
# Appended to JAX's key: entries JAX wrote unchecked (another name) are never read as ours.
KEY_SUFFIX = "-checked"
_DIGEST_BYTES = 32


def default_directory() -> Optional[str]:
  """The cache directory the environment asks for (None: off)."""
  chosen = os.environ.get(ENV)
  if chosen is not None:
    return None if chosen.strip().lower() in ("", "off", "0", "false", "none") else chosen
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elm_jax", "jax")


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Turns the cache on in `directory` (default: `default_directory()`) for this process and
  returns it; None when it is off, when its local directory cannot be made, or when this JAX
  offers no way to check its entries (then every program is compiled, as without the cache,
  and a note says why)."""
  directory = default_directory() if directory is None else directory
  if not directory:
    return None
  if "://" not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      print(f"note: compilation cache off: cannot create {directory}: {e.strerror}", file=sys.stderr)
      return None
  import jax  # lazily: `elm-jax version` and argument errors start without JAX
  if not _install_checked_cache():
    print(f"note: compilation cache off: jax {jax.__version__} offers no way to check its entries "
          "(elm_jax/compile_cache.py)", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  _use_directory(directory)
  return directory


# ---------------------------------------------------------------------------- entries
def pack(key: str, executable: bytes) -> bytes:
  """The bytes stored for `key`: MAGIC, the key's length (4 bytes) and UTF-8 text, the sha256
  of key and executable, then the executable (JAX's compressed entry)."""
  name = key.encode("utf-8")
  digest = hashlib.sha256(name + executable).digest()
  return MAGIC + len(name).to_bytes(4, "big") + name + digest + executable


def unpack(key: str, entry: bytes) -> tuple[Optional[bytes], Optional[str]]:
  """(executable, None) when `entry` is `pack(key, executable)`; (None, what is wrong) when it
  was written for another key, or is damaged or not an entry at all."""
  if not entry.startswith(MAGIC):
    return None, "not a checked entry (no elm_jax header): damaged, or written by something else"
  start = len(MAGIC) + 4
  length = int.from_bytes(entry[len(MAGIC):start], "big")
  if len(entry) < start + length + _DIGEST_BYTES:
    return None, f"damaged: {len(entry)} bytes, too short for its header (truncated)"
  name = entry[start:start + length]
  digest = entry[start + length:start + length + _DIGEST_BYTES]
  executable = entry[start + length + _DIGEST_BYTES:]
  if hashlib.sha256(name + executable).digest() != digest:
    return None, "damaged: its sha256 does not match its contents (truncated or overwritten)"
  if name != key.encode("utf-8"):
    return None, (f"holds the program compiled for {_short(name.decode('utf-8', 'replace'))}, not "
                  "this one (a file renamed or copied over another's)")
  return executable, None


def _short(key: str) -> str:
  """A cache key ('jit_f-<64 hex digits>') for a message: its name and 12 digits."""
  name, _, digits = key.rpartition("-")
  return f"{name}-{digits[:12]}..." if name and len(digits) > 12 else key[:80]


class CheckedCache:
  """A JAX compilation-cache backend (the `CacheInterface` methods `get` and `put`) over JAX's
  own file cache (`base`, an `LRUCache`, whose size limit and eviction stay JAX's) that stores
  every entry as `pack` makes it and hands JAX only an executable read back under its own key.
  Anything else is a miss: one warning line, the entry deleted (the program compiled again
  replaces it). Failures to read or write the cache never stop the program."""

  def __init__(self, base: Any):
    self._base = base
    self._path = base._path  # pylint: disable=protected-access  (JAX reads it for its logs)
    self._warned: set[str] = set()

  def _file(self, key: str):
    from jax._src import lru_cache  # pylint: disable=import-outside-toplevel
    return self._base.path / f"{key}{KEY_SUFFIX}{getattr(lru_cache, '_CACHE_SUFFIX', '-cache')}"

  def _warn(self, key: str, what: str) -> None:
    if key not in self._warned:
      self._warned.add(key)
      print(f"warning: compilation cache: {what}", file=sys.stderr)

  def get(self, key: str) -> Optional[bytes]:
    """The executable stored for `key`, or None (a miss)."""
    try:
      entry = self._base.get(key + KEY_SUFFIX)
    except OSError as e:
      self._warn(key, f"{self._file(key)}: cannot be read ({e.strerror or e}); compiling the program")
      return None
    if entry is None:
      return None
    executable, problem = unpack(key, entry)
    if executable is None:
      self._warn(key, f"{self._file(key)}: {problem}; skipped, compiling the program")
      with contextlib.suppress(OSError):
        self._file(key).unlink()
    return executable

  def put(self, key: str, value: bytes) -> None:
    """Stores `value` (JAX's compressed executable) for `key`, written to a temporary name and
    renamed into place (so no process reads half of it) unless JAX's size limit is on (then
    JAX writes it and keeps its accounting); a failed write is a warning."""
    from elm_jax import files  # pylint: disable=import-outside-toplevel
    entry = pack(key, value)
    try:
      if getattr(self._base, "eviction_enabled", True):
        self._base.put(key + KEY_SUFFIX, entry)
        return
      path = self._file(key)
      if not path.exists():  # as JAX's cache: an entry is never rewritten
        files.write_atomically(path, entry)
    except files.FileCheckError as e:
      self._warn(key, f"{e}; the program runs uncached")
    except OSError as e:
      self._warn(key, f"{self._file(key)}: cannot be written ({e.strerror or e}); the program "
                      "runs uncached")


def _install_checked_cache() -> bool:
  """Makes JAX build its persistent cache as a `CheckedCache` over its file cache (JAX has no
  public hook for a cache backend: this replaces `compilation_cache.get_file_cache`); False
  when this JAX lacks what that needs."""
  try:
    from jax._src import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
    from jax._src import config as jax_config  # pylint: disable=import-outside-toplevel
    from jax._src.lru_cache import LRUCache  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  needed = ("get_file_cache", "reset_cache", "VerificationCache", "_cache")
  settings = ("compilation_cache_max_size", "compilation_cache_check_contents")
  if not all(hasattr(jax_cache, name) for name in needed) or not all(
      hasattr(jax_config, name) for name in settings):
    return False
  if getattr(jax_cache.get_file_cache, "checked_by_elm_jax", False):
    return True

  def get_file_cache(path: str):
    cache = CheckedCache(LRUCache(path, max_size=jax_config.compilation_cache_max_size.value))
    if jax_config.compilation_cache_check_contents.value:
      return jax_cache.VerificationCache(cache), path
    return cache, path

  get_file_cache.checked_by_elm_jax = True
  jax_cache.get_file_cache = get_file_cache
  if jax_cache._cache is not None:  # pylint: disable=protected-access  (built unchecked before)
    jax_cache.reset_cache()
  return True


def _use_directory(directory: str) -> None:
  """Drops a cache JAX built for another directory, so the next compilation opens `directory`
  (JAX builds its cache once and does not follow later changes of the setting)."""
  from jax._src import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
  cache = jax_cache._cache  # pylint: disable=protected-access
  if cache is not None and str(getattr(cache, "_path", "")).rstrip("/") != directory.rstrip("/"):
    jax_cache.reset_cache()
