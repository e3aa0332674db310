"""Gin at the edges, in t5x's flag form: `--gin_file=...`, `--gin.NAME=VALUE`, `--gin_search_paths=...`.

Library code takes plain keyword arguments; gin files bind them. Model files define the
`MODEL_CONFIG` macro (`MODEL_CONFIG = @t5_config.T5Config()`), which `model_config_from_gin`
returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tokenize
from typing import TYPE_CHECKING, Optional, Sequence

import gin

from elm_jax.errors import UserInputError

if TYPE_CHECKING:
  from elm_jax.models.t5_config import T5Config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN_CONFIGS_DIR = os.path.join(REPO_ROOT, "gin_configs")


class GinFlagError(UserInputError):
  """A malformed gin flag, or a gin file or binding that does not parse."""


@dataclasses.dataclass
class GinFlags:
  """The gin flags of one command line: files and bindings in order, extra search paths."""

  files: list[str] = dataclasses.field(default_factory=list)
  bindings: list[str] = dataclasses.field(default_factory=list)
  search_paths: list[str] = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.files or self.bindings)


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], GinFlags]:
  """Separates t5x-style gin flags (which argparse cannot take) from the other arguments."""
  rest, flags = [], GinFlags()
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--gin_file") or arg.startswith("--gin_search_paths"):
      name, sep, value = arg.partition("=")
      if not sep:
        if i + 1 >= len(args):
          raise GinFlagError(f"{arg}: expected a value ({arg}=PATH)")
        value, i = args[i + 1], i + 1
      if name == "--gin_file":
        flags.files.append(value)
      elif name == "--gin_search_paths":
        flags.search_paths.extend(p for p in value.split(",") if p)
      else:
        raise GinFlagError(f"{arg}: unknown gin flag; expected --gin_file or --gin_search_paths")
    elif arg.startswith("--gin."):
      binding = arg[len("--gin."):]
      name, sep, value = binding.partition("=")
      if not sep or not name:
        raise GinFlagError(f"{arg}: expected --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100")
      flags.bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
    i += 1
  return rest, flags


# What gin raises while parsing: unknown configurables or parameters (ValueError), bad syntax
# (SyntaxError, tokenize.TokenError for unbalanced brackets), a failed `import` (ImportError) or
# a missing `include` (OSError).
_GIN_PARSE_ERRORS = (ValueError, SyntaxError, tokenize.TokenError, ImportError, NameError, OSError)
_search_paths_added: set[str] = set()
# Command-line bindings may name these modules by their short names whatever the gin files
# imported (gin resolves a binding's names against the imports of the text it is parsed with).
_BINDING_IMPORTS = ("from __gin__ import dynamic_registration\n"
                    "import elm_jax.partitioning as partitioning\n"
                    "import elm_jax.models.t5_config as t5_config\n"
                    "import elm_jax.models.adapters as adapters\n"
                    "import elm_jax.training.train_step as train_step\n"
                    "import elm_jax.training.run as run\n"
                    "import elm_jax.training.plans as plans\n")


def parse_gin(flags: GinFlags) -> None:
  """Parses gin files, then bindings, into a fresh gin config.

  Files are looked up in the working directory, the repo root, its `gin_configs/` and
  `flags.search_paths` (so `gin_configs/models/t5_1_1_small.gin` and `models/t5_1_1_small.gin`
  both work); `include` statements inside them search the same places. An error names the
  `--gin_file` or `--gin.` binding that caused it.
  """
  gin.clear_config()
  if not flags:
    return
  # Lazy (JAX, about a second): so that `dynamic_registration` imports in gin files find the
  # model configurables; commands given no gin flags (`tasks list`) do not pay for it.
  import elm_jax.models.t5_config  # noqa: F401

  _guard_gin_file_readers()
  for path in [REPO_ROOT, GIN_CONFIGS_DIR, os.getcwd(), *flags.search_paths]:
    if path not in _search_paths_added:  # gin keeps search paths across clear_config()
      gin.add_config_file_search_path(path)
      _search_paths_added.add(path)
  for file in flags.files:
    path = _resolve_gin_file(file, flags.search_paths)
    try:
      gin.parse_config_file(path)
    except _GIN_PARSE_ERRORS as e:
      raise GinFlagError(f"--gin_file={file}: {_describe(e)}") from None
  for binding in flags.bindings:
    try:
      gin.parse_config(_BINDING_IMPORTS + binding)
    except _GIN_PARSE_ERRORS as e:
      hint = ""
      if "Failed to parse token" in str(e) or "malformed node" in str(e):
        hint = ("\n  (a string value needs gin quotes inside the shell's, e.g. "
                "--gin.DTYPE=\"'bfloat16'\")")
      raise GinFlagError(f"--gin.{binding.replace(' = ', '=', 1)}: {_describe(e)}{hint}") from None


def _guard_gin_file_readers() -> None:
  """Makes gin's file lookup treat a crashing existence check as "not here".

  gin's package-resource reader (`gin.resource_reader`) reads `include 'models/x.gin'` as the
  package `models`; when a folder of that name is a namespace package on `sys.path` (say
  `tests/models` under pytest, or `./runs` under `python -m`) it raises TypeError instead of
  returning False, and the include fails although the file is on a search path. gin offers no
  public hook to reorder or replace readers, so the checks registered in `gin.config` are
  wrapped once.
  """
  readers = getattr(gin.config, "_FILE_READERS", None)
  if not isinstance(readers, list):
    return
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "_elm_guarded", False):
      continue

    def guarded(path, _exists=exists):
      # The package-resource check also logs "ERROR:root:Path not found" for every search
      # path that is not a package (all of ours); a miss there is normal, so it stays quiet.
      previous = logging.root.manager.disable
      logging.disable(logging.ERROR)
      try:
        return _exists(path)
      except TypeError:
        return False
      finally:
        logging.disable(previous)
    guarded._elm_guarded = True
    readers[i] = (reader, guarded)


# What gin appends to an exception raised inside a configurable it calls (one line per nested
# call): where the error happened in gin's terms, which the error's own message already says in
# the user's (the binding, the field).
_GIN_CALL_CONTEXT = re.compile(r"\n  In call to configurable '[^'\n]*' \([^\n]*\)(?: in scope '[^'\n]*')?")


def without_gin_context(message: str) -> str:
  """`message` without the "In call to configurable 'train' (<function ...>)" lines that gin
  appends to an error raised inside a configurable."""
  return _GIN_CALL_CONTEXT.sub("", message)


def _describe(error: BaseException) -> str:
  if isinstance(error, tokenize.TokenError):  # args: (message, (line, column))
    return f"{error.args[0]} (unbalanced brackets or quotes?)"
  return str(error)


def _resolve_gin_file(file: str, search_paths: Sequence[str]) -> str:
  for base in ["", REPO_ROOT, GIN_CONFIGS_DIR, *search_paths]:
    candidate = os.path.join(base, file) if base else file
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise GinFlagError(f"--gin_file={file}: not found (searched the working directory, "
                     f"{REPO_ROOT}, {GIN_CONFIGS_DIR} and --gin_search_paths)")


def model_config_from_gin() -> T5Config:
  """The T5Config that the `MODEL_CONFIG` macro of the parsed gin model file builds."""
  from elm_jax.models.t5_config import T5Config  # lazy: see parse_gin

  try:
    config = gin.query_parameter("%MODEL_CONFIG")
  except ValueError:
    raise GinFlagError("no MODEL_CONFIG is bound: pass a model gin file, e.g. "
                       "--gin_file=gin_configs/models/t5_1_1_small.gin") from None
  if isinstance(config, gin.config.ConfigurableReference):
    config = config.scoped_configurable_fn()
  if not isinstance(config, T5Config):
    raise GinFlagError(f"MODEL_CONFIG: expected @t5_config.T5Config(), got {config!r}")
  return config


def model_config_or_none() -> Optional[T5Config]:
  """The gin model file's config when one is bound, else None (a Hugging Face checkpoint
  carries its own; a T5X checkpoint needs this one)."""
  try:
    gin.query_parameter("%MODEL_CONFIG")
  except ValueError:
    return None
  return model_config_from_gin()
