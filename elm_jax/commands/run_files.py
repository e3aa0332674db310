"""Run files for the evaluating commands, t5x-style: `runs/eval.gin`, `runs/score.gin` and
`runs/retrieve.gin` bind UPPER_CASE macros that stand for the command's flags
(`--gin_file=runs/eval.gin --gin.TASK="'t0_eval_score'" --gin.LIBRARY="'/lib'"`).

A flag given on the command line wins over its macro; a macro fills a flag left at its default;
the macro `MESH_CONFIG` (a `@partitioning.MeshConfig()`) stands for `--mesh`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import gin

from elm_jax import partitioning
from elm_jax.errors import UserInputError
from elm_jax.evaluation import placement


def _macro(name: str) -> tuple[bool, Any]:
  try:
    return True, gin.query_parameter(f"%{name}")
  except ValueError:
    return False, None


def fill_from_gin(args: argparse.Namespace, parser_defaults: dict[str, Any], required: Sequence[str]) -> None:
  """Sets each flag of `args` still at its default from the gin macro of its name in capitals
  (a value of the flag's own type, or None for the flag's 'none' or 'all'); then refuses a `required` flag that neither gave."""
  for name, default in parser_defaults.items():
    if name.startswith("_") or getattr(args, name, default) != default:
      continue
    bound, value = _macro(name.upper())
    if not bound:
      continue
    if value is not None and default is not None and not isinstance(value, type(default)):
      raise UserInputError(f"--gin.{name.upper()}={value!r}: expected a {type(default).__name__}, like "
                           f"the flag --{name}")
    setattr(args, name, value)
  for name in required:
    if getattr(args, name, None) in (None, ""):
      raise UserInputError(f"--{name} is required (or bind {name.upper()} in a run file, e.g. "
                           f"--gin.{name.upper()}=\"'...'\")")


def parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
  """Each flag's default, by its destination name."""
  return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def mesh_config_from_gin() -> Optional[partitioning.MeshConfig]:
  """The MeshConfig that gin binds (the `MESH_CONFIG` macro, or bindings of
  `partitioning.MeshConfig`'s fields), or None when gin binds neither."""
  try:
    value = gin.query_parameter("%MESH_CONFIG")
  except ValueError:
    value = None
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  if isinstance(value, partitioning.MeshConfig):
    return value
  bound = {}
  for axis in partitioning.MESH_AXES:
    try:
      bound[axis] = gin.query_parameter(f"partitioning.MeshConfig.{axis}")
    except ValueError:
      continue
  if not bound:
    return None
  for axis, size in bound.items():
    if not isinstance(size, int) or isinstance(size, bool):
      raise UserInputError(f"--gin.partitioning.MeshConfig.{axis}: expected an integer, got {size!r}")
  defaults = {"data": 1, "expert": 1, "model": 1}
  return partitioning.MeshConfig(**{**defaults, **bound})


def mesh_config(mesh_flag) -> Optional[partitioning.MeshConfig]:
  """The mesh an evaluating command runs on: `--mesh`, else gin's (None: let the command choose)."""
  return placement.parse_mesh_flag(mesh_flag) or mesh_config_from_gin()


def choose_placement(loaded, what: str, *, batch_size: int, expert_chunk: Optional[int],
                     mesh_config: Optional[partitioning.MeshConfig], max_input_length: int,
                     max_target_length: int) -> placement.Placement:
  """The mesh and expert chunk an evaluating command (or `elm_jax.api`) scores `loaded`'s experts
  on: `mesh_config` (`--mesh` or gin's, through `mesh_config`; None: every device) and
  `expert_chunk` (None: from the devices' memory); the layout is printed in one line on stderr."""
  chosen = placement.choose(len(loaded.names), loaded.config, loaded.backbone, loaded.stack.params,
                            batch_size=batch_size, max_input_length=max_input_length,
                            max_target_length=max_target_length, expert_chunk=expert_chunk,
                            mesh_config=mesh_config, what=what)
  print(chosen.description, file=sys.stderr)
  return chosen
