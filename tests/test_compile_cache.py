"""The persistent compilation cache never runs one program's executable for another, and a
damaged entry is a miss with one warning line (`elm_jax/compile_cache.py`).

Each test compiles tiny programs into its own cache directory (every program written: minimum
compile time 0) and restores JAX's cache settings afterwards (the suite's cache, enabled in
tests/conftest.py, is rebuilt on the next compilation). Fresh Python functions are traced,
lowered and compiled again each time, so every call below looks its program up in the cache.
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest
from jax._src import compilation_cache as jax_cache

from elm_jax import compile_cache

X = np.arange(3, dtype=np.float32)


@pytest.fixture
def cache_dir(tmp_path):
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  directory = str(tmp_path / "cache")
  assert compile_cache.enable(directory) == directory
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield directory
  for name, value in saved.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


def run_programs() -> list[np.ndarray]:
  """add_one(X), double(X), subtract(X, X) with functions compiled (or loaded) afresh."""
  def add_one(x):
    return x + 1

  def double(x):
    return x * 2

  def subtract(x, y):
    return x - y
  return [np.asarray(jax.jit(add_one)(X)), np.asarray(jax.jit(double)(X)),
          np.asarray(jax.jit(subtract)(X, X))]


def assert_right(results) -> None:
  np.testing.assert_array_equal(results[0], X + 1)
  np.testing.assert_array_equal(results[1], X * 2)
  np.testing.assert_array_equal(results[2], X * 0)


def entries(directory: str) -> dict[str, str]:
  """program name ('add_one') -> its entry's file."""
  out = {}
  for name in os.listdir(directory):
    if name.startswith("jit_") and name.endswith("-cache"):
      out[name[len("jit_"):].split("-")[0]] = os.path.join(directory, name)
  return out


def warning_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.strip()]


def run_and_check(capsys) -> list[str]:
  """Runs the programs (right results, no traceback, no JAX warning); the stderr lines."""
  capsys.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert_right(run_programs())
  assert not [w for w in caught if "compilation cache" in str(w.message)], [str(w.message) for w in caught]
  return warning_lines(capsys.readouterr().err)


def test_swapped_entries_are_never_run(cache_dir, capsys):
  assert run_and_check(capsys) == []
  files = entries(cache_dir)
  assert {"add_one", "double", "subtract"} <= set(files)
  a, b, c = files["add_one"], files["double"], files["subtract"]
  os.rename(a, a + ".x")
  os.rename(b, a)                      # double's executable under add_one's name: same signature
  os.rename(a + ".x", b)
  with open(c, "rb") as f:
    other = f.read()
  with open(files["add_one"], "wb") as f:  # and subtract's (two arguments) under add_one's
    f.write(other)
  lines = run_and_check(capsys)
  assert len(lines) == 2, lines
  assert any(line.startswith(f"warning: compilation cache: {a}: holds the program compiled for "
                             "jit_subtract-") for line in lines), lines
  assert any(line.startswith(f"warning: compilation cache: {b}: holds the program compiled for "
                             "jit_add_one-") for line in lines), lines
  assert all(line.endswith("skipped, compiling the program") for line in lines), lines
  assert run_and_check(capsys) == []   # compiled again and written again: no more warnings


def test_damaged_entries_are_skipped_with_one_line(cache_dir, capsys):
  assert run_and_check(capsys) == []
  files = entries(cache_dir)
  with open(files["add_one"], "r+b") as f:
    f.truncate(os.path.getsize(files["add_one"]) // 2)
  with open(files["double"], "wb") as f:
    f.write(b"\x28\xb5\x2f\xfd garbage")
  data = bytearray(open(files["subtract"], "rb").read())
  data[-40] ^= 0x01
  with open(files["subtract"], "wb") as f:
    f.write(bytes(data))
  lines = run_and_check(capsys)
  assert len(lines) == 3, lines
  assert sum("damaged: its sha256 does not match" in line for line in lines) == 2, lines
  assert sum("not a checked entry" in line for line in lines) == 1, lines
  assert run_and_check(capsys) == []


def test_entries_jax_wrote_unchecked_are_not_read(cache_dir, capsys):
  """An entry under JAX's own name (no elm_jax header) is a different file: never read."""
  assert run_and_check(capsys) == []
  for path in entries(cache_dir).values():
    assert compile_cache.KEY_SUFFIX in path
    os.rename(path, path.replace(compile_cache.KEY_SUFFIX, ""))
  assert run_and_check(capsys) == []
  checked = [n for n in os.listdir(cache_dir) if n.endswith(compile_cache.KEY_SUFFIX + "-cache")]
  assert {n.split("-")[0] for n in checked} >= {"jit_add_one", "jit_double", "jit_subtract"}


def test_a_failed_cache_write_is_one_warning(cache_dir, capsys, monkeypatch):
  from elm_jax import files

  def full(path, data):
    raise files.FileCheckError(f"{path}: no space left on device writing {len(data)} bytes")
  monkeypatch.setattr(files, "write_atomically", full)
  lines = run_and_check(capsys)
  assert lines and all("no space left on device" in line and line.endswith("the program runs uncached")
                       for line in lines), lines
  assert entries(cache_dir) == {}


def test_pack_and_unpack():
  entry = compile_cache.pack("jit_f-" + "a" * 64, b"executable")
  assert compile_cache.unpack("jit_f-" + "a" * 64, entry) == (b"executable", None)
  executable, problem = compile_cache.unpack("jit_g-" + "b" * 64, entry)
  assert executable is None and problem.startswith("holds the program compiled for jit_f-aaaaaaaaaaaa...")
  assert compile_cache.unpack("k", entry[:-1])[1].startswith("damaged: its sha256")
  assert compile_cache.unpack("k", entry[:len(compile_cache.MAGIC) + 6])[1].startswith("damaged:")
  assert compile_cache.unpack("k", b"")[1].startswith("not a checked entry")
