"""JAX's persistent compilation cache, on for every elm-jax command and the test suite.

A compiled XLA program is written to disk keyed by the program and the backend, and a later
process that needs the same program loads it instead of compiling it again: the demo's and the
tests' second runs, every `score` of the same task shapes, and the scorer's finer length
buckets (`batching.cost_bucket`) cost their compilations once per machine. The directory is
`$ELM_JAX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/elm_jax/jax` (`~/.cache/elm_jax/jax`);
`ELM_JAX_COMPILATION_CACHE=off` turns it off. Any path `jax` can write works (`gs://` included).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

ENV = "ELM_JAX_COMPILATION_CACHE"
# Programs that compile faster than this are not written (reading one back costs about as much).
MIN_COMPILE_SECONDS = 0.25


def default_directory() -> Optional[str]:
  """The cache directory the environment asks for (None: off)."""
  chosen = os.environ.get(ENV)
  if chosen is not None:
    return None if chosen.strip().lower() in ("", "off", "0", "false", "none") else chosen
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elm_jax", "jax")


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Turns the cache on in `directory` (default: `default_directory()`) for this process and
  returns it; None when it is off or its local directory cannot be made (then every program is
  compiled, as without the cache, and a note says why)."""
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
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory
