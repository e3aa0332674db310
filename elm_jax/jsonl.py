"""JSON Lines files: one JSON object per line, errors naming the file and the line."""

from __future__ import annotations

import json
import os
from typing import Any

from elm_jax.errors import UserInputError


class JsonlError(UserInputError):
  """A JSONL file that is missing or holds a line that is not a JSON object."""


def read_objects(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) for every non-blank line of `path`."""
  if not os.path.isfile(path):
    raise JsonlError(f"{path}: file not found")
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise JsonlError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
      rows.append((number, row))
  return rows
