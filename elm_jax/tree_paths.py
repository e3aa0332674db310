"""Nested parameter dicts <-> flat {path: leaf} maps, the one way the project addresses leaves.

A path is a tuple of keys (`("encoder", "layers_0", "mlp", "wo", "kernel")`); `join` gives its
"/"-separated form, as used in safetensors keys and error messages.
"""

from __future__ import annotations

from typing import Any, Mapping

Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {path tuple: leaf}; a leaf is anything that is not a mapping."""
  flat: dict[Path, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def join(path: Path) -> str:
  return "/".join(path)


def split(path: str) -> Path:
  return tuple(path.split("/"))
