"""Gin at the edges, in t5x's flag form: `--gin_file=...`, `--gin.NAME=VALUE`, `--gin_search_paths=...`.

Library code takes plain keyword arguments; gin files bind them. Model files define the
`MODEL_CONFIG` macro (`MODEL_CONFIG = @t5_config.T5Config()`), which `model_config_from_gin`
returns.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import gin

from elm_jax.errors import UserInputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_CONFIGS_DIR = os.path.join(REPO_ROOT, "gin_configs")


class GinFlagError(UserInputError):
  """A malformed gin flag, or a gin file or binding that does not parse."""


@dataclasses.dataclass
class GinFlags:
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


def parse_gin(flags: GinFlags) -> None:
  """Parses gin files then bindings; the repo's gin_configs/ and its parent are searched."""
  import elm_jax.models.t5_config  # noqa: F401  (so `dynamic_registration` can find it)

  gin.clear_config()
  for path in [REPO_ROOT, GIN_CONFIGS_DIR, os.getcwd(), *flags.search_paths]:
    gin.add_config_file_search_path(path)
  files = [_resolve_gin_file(file, flags.search_paths) for file in flags.files]
  try:
    gin.parse_config_files_and_bindings(files, flags.bindings, finalize_config=False)
  except (ValueError, SyntaxError, ImportError, NameError) as e:
    raise GinFlagError(f"gin: {e}") from None


def _resolve_gin_file(file: str, search_paths: Sequence[str]) -> str:
  for base in ["", REPO_ROOT, GIN_CONFIGS_DIR, *search_paths]:
    candidate = os.path.join(base, file) if base else file
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise GinFlagError(f"--gin_file={file}: not found (searched the working directory, "
                     f"{REPO_ROOT}, {GIN_CONFIGS_DIR} and --gin_search_paths)")


def model_config_from_gin():
  """The `MODEL_CONFIG` macro's T5Config, as bound by a gin model file."""
  try:
    config = gin.query_parameter("%MODEL_CONFIG")
  except ValueError:
    raise GinFlagError("no MODEL_CONFIG is bound: pass a model gin file, e.g. "
                       "--gin_file=gin_configs/models/t5_1_1_small.gin") from None
  if isinstance(config, gin.config.ConfigurableReference):
    config = config.scoped_configurable_fn()
  return config
