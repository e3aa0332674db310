"""JSON Lines files: one JSON object per line, errors naming the file and the line."""

from __future__ import annotations

import json
import os
from typing import Any

from elm_jax import files
from elm_jax.errors import UserInputError


class JsonlError(UserInputError):
  """A JSONL file that is missing, unreadable, or holds a line that is not a JSON object."""


def _no_constants(name: str):
  raise ValueError(f"{name} is not a JSON number")


def read_objects(path: str, flag: str = "") -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) for every non-blank line of `path`. Refused, naming `path:line`: a
  line that is not UTF-8, not JSON (NaN and Infinity included: they are not JSON), or not an
  object; and a missing, unreadable or directory `path`."""
  try:
    files.check_input_file(path, flag, what="file")
  except files.FileCheckError as e:
    raise JsonlError(str(e)) from None
  rows = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line, parse_constant=_no_constants)
      except json.JSONDecodeError as e:
        raise JsonlError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
      except ValueError as e:
        raise JsonlError(f"{path}:{number}: not valid JSON ({e})") from None
      if not isinstance(row, dict):
        raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
      rows.append((number, row))
  return rows


def write_objects(path: str | os.PathLike, records) -> None:
  """Writes one JSON object per line as a command's output (`files.write_output`: atomically,
  never a half-written file; a device or FIFO such as /dev/stdout in place); non-finite numbers
  are refused rather than written as non-standard JSON."""
  data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")
  files.write_output(path, data)
