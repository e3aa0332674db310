"""The Expert Library: a directory of expert directories, a manifest and an append-only history.

    <library>/manifest.json            names, metadata, content hashes, the backbone fingerprint
    <library>/history.jsonl            one line per add / remove, never rewritten
    <library>/experts/<name>/          tensors.safetensors + expert.json, as the trainer wrote them
    <library>/retrieval/keys/<name>.jsonl            training instances used as retrieval keys
    <library>/retrieval/embeddings/<embedder>/<format>/<name>.npy   their embeddings (a cache)

The library may live on any path `etils.epath` handles (a local directory or a cloud bucket).
Every file is written to a temporary name and renamed into place, so a reader never sees half
a file. Writers take an exclusive lock (`<library>/.lock`, `fcntl.flock`) around each
read-modify-write of the manifest; on object stores, where no such lock exists, writes are
atomic per file but concurrent writers must be kept apart by the caller. Adding an expert
writes only new files: existing experts, keys and embeddings are never touched.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import uuid
from typing import Any, Iterator, Optional, Sequence

from etils import epath

from elm_jax.errors import UserInputError
from elm_jax.library import expert_files

MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
FORMAT_VERSION = 1
_EXPERT_FILES = (expert_files.TENSORS_FILE, expert_files.METADATA_FILE)


class LibraryError(UserInputError):
  """A malformed library, an unknown or duplicate expert, or files that fail verification."""


def safe_name(name: str) -> str:
  """The file-system name of an expert ('/' and other separators replaced)."""
  if not name or name in (".", ".."):
    raise LibraryError(f"expert name {name!r}: expected a non-empty name")
  return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def file_digest(path: epath.Path) -> tuple[str, int]:
  """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
  digest, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
      size += len(block)
  return digest.hexdigest(), size


def write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a temporary sibling, then renames it over `path`."""
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ExpertLibrary:
  """An expert store rooted at `root` (created by `ExpertLibrary.create` or on first `add`)."""

  def __init__(self, root: str | os.PathLike, create: bool = False):
    self.root = epath.Path(root)
    if not (self.root / MANIFEST).exists():
      if not create:
        raise LibraryError(f"{self.root / MANIFEST}: not found; {self.root} is not an expert library "
                           "(create one with `elm-jax library add --library=DIR EXPERT_DIR`)")
      self.root.mkdir(parents=True, exist_ok=True)
      with self._lock():
        if not (self.root / MANIFEST).exists():
          self._write_manifest({"format_version": FORMAT_VERSION, "backbone_fingerprint": None,
                                "backbone_checkpoint": None, "experts": {}})

  # ------------------------------------------------------------------ manifest and lock
  @contextlib.contextmanager
  def _lock(self) -> Iterator[None]:
    if not _is_local(self.root):
      yield
      return
    import fcntl
    with open(os.fspath(self.root / ".lock"), "a") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  def manifest(self) -> dict[str, Any]:
    path = self.root / MANIFEST
    try:
      manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise LibraryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("experts"), dict):
      raise LibraryError(f"{path}: field 'experts' must be an object of expert name -> entry")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise LibraryError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}; "
                         f"this version of elm_jax reads {FORMAT_VERSION}")
    return manifest

  def _write_manifest(self, manifest: dict[str, Any]) -> None:
    write_atomically(self.root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

  def _append_history(self, record: dict[str, Any]) -> None:
    with (self.root / HISTORY).open("a") as f:
      f.write(json.dumps({"time": _now(), **record}, sort_keys=True) + "\n")

  def history(self) -> list[dict[str, Any]]:
    path = self.root / HISTORY
    if not path.exists():
      return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

  # ------------------------------------------------------------------ queries
  def names(self) -> list[str]:
    return sorted(self.manifest()["experts"])

  def entry(self, name: str) -> dict[str, Any]:
    experts = self.manifest()["experts"]
    if name not in experts:
      raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}; the library holds "
                         f"{len(experts)} expert(s): {', '.join(sorted(experts)[:10])}"
                         f"{' ...' if len(experts) > 10 else ''}")
    return experts[name]

  def expert_dir(self, name: str) -> epath.Path:
    return self.root / self.entry(name)["directory"]

  def resolve(self, selection: str | Sequence[str]) -> list[str]:
    """'all', a comma-separated string or a list of names -> names, in library order for 'all'
    and in the given order otherwise; unknown names are an error."""
    if isinstance(selection, str):
      if selection == "all":
        return self.names()
      selection = [s for s in selection.split(",") if s]
    for name in selection:
      self.entry(name)
    if len(set(selection)) != len(selection):
      raise LibraryError(f"--experts: names repeat in {list(selection)}")
    return list(selection)

  def load(self, name: str, backbone_fingerprint: Optional[str] = None):
    """(expert parameter tree, ExpertMetadata) of one expert."""
    return expert_files.load_expert(os.fspath(self.expert_dir(name)), backbone_fingerprint)

  def load_stacked(self, names: Sequence[str], backbone_fingerprint: Optional[str] = None):
    """(experts stacked [E, ...], their metadata). All must share one expert config."""
    import numpy as np

    from elm_jax import tree_paths
    trees, metas = [], []
    for name in names:
      tree, meta = self.load(name, backbone_fingerprint)
      if metas and meta.expert_config != metas[0].expert_config:
        raise LibraryError(f"{self.expert_dir(name)}: expert {name!r} has expert_config "
                           f"{meta.expert_config}, unlike {metas[0].name!r} ({metas[0].expert_config}); "
                           "experts scored together must share one configuration")
      trees.append(tree_paths.flatten(tree))
      metas.append(meta)
    if not trees:
      raise LibraryError(f"{self.root}: no experts selected")
    keys = set(trees[0])
    for name, flat in zip(names, trees):
      if set(flat) != keys:
        raise LibraryError(f"{self.expert_dir(name)}: expert {name!r} holds other tensors than "
                           f"{names[0]!r}")
    stacked = {k: np.stack([flat[k] for flat in trees]) for k in keys}
    return tree_paths.unflatten(stacked), metas

  # ------------------------------------------------------------------ writes
  def add(self, expert_dir: str | os.PathLike, name: Optional[str] = None,
          keys: Optional[Sequence[dict[str, Any]]] = None,
          provenance: Optional[dict[str, Any]] = None) -> str:
    """Copies a trainer-written expert directory into the library under `name` (default: its
    metadata name) with optional retrieval `keys`; returns the name. Refuses a name already
    present and an expert trained on another backbone than the library's."""
    source = epath.Path(expert_dir)
    _, metadata = expert_files.load_expert(os.fspath(source))
    name = name or metadata.name
    directory = f"experts/{safe_name(name)}"
    files = {}
    staged = self.root / f"experts/.{safe_name(name)}.{uuid.uuid4().hex}.tmp"
    staged.mkdir(parents=True)
    try:
      for file in _EXPERT_FILES:
        (source / file).copy(staged / file)
        digest, size = file_digest(staged / file)
        files[file] = {"sha256": digest, "bytes": size}
      with self._lock():
        manifest = self.manifest()
        self._check_new(manifest, name, directory, metadata)
        if keys is not None:
          self._write_keys(name, keys)
        staged.rename(self.root / directory)
        manifest["backbone_fingerprint"] = manifest["backbone_fingerprint"] or metadata.backbone_fingerprint
        checkpoint = metadata.training_config.get("backbone_checkpoint")
        manifest["backbone_checkpoint"] = manifest.get("backbone_checkpoint") or checkpoint
        manifest["experts"][name] = {
            "directory": directory, "task": metadata.task, "prompt": metadata.prompt,
            "kind": metadata.expert_config.get("kind"), "steps": metadata.steps, "files": files,
            "keys": keys is not None, "added": _now(), "provenance": provenance or {"source": os.fspath(source)}}
        self._write_manifest(manifest)
        self._append_history({"action": "add", "name": name, "files": files})
    finally:
      if staged.exists():
        staged.rmtree()
    return name

  def _check_new(self, manifest, name: str, directory: str, metadata) -> None:
    if name in manifest["experts"]:
      raise LibraryError(f"{self.root / MANIFEST}: an expert named {name!r} is already in the library; "
                         "experts are never replaced (remove it first, or add under another --name)")
    if (self.root / directory).exists():
      raise LibraryError(f"{self.root / directory}: exists but is not in the manifest; remove it by hand")
    fingerprint = manifest["backbone_fingerprint"]
    if fingerprint and metadata.backbone_fingerprint != fingerprint:
      raise LibraryError(f"expert {name!r} was trained on backbone {metadata.backbone_fingerprint}; "
                         f"this library's experts use {fingerprint}")

  def _write_keys(self, name: str, keys: Sequence[dict[str, Any]]) -> None:
    path = self.keys_path(name)
    if path.exists():
      raise LibraryError(f"{path}: retrieval keys for {name!r} already exist and are never rewritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps(k, sort_keys=True) + "\n" for k in keys).encode())

  def remove(self, name: str) -> None:
    """Deletes an expert, its keys and its cached embeddings (recorded in the history)."""
    with self._lock():
      manifest = self.manifest()
      entry = manifest["experts"].pop(name, None)
      if entry is None:
        raise LibraryError(f"{self.root / MANIFEST}: no expert named {name!r}")
      self._write_manifest(manifest)
      self._append_history({"action": "remove", "name": name, "files": entry["files"]})
      for path in [self.root / entry["directory"], self.keys_path(name)] + self._embedding_files(name):
        if path.is_dir():
          path.rmtree()
        elif path.exists():
          path.unlink()

  # ------------------------------------------------------------------ retrieval keys
  def keys_path(self, name: str) -> epath.Path:
    return self.root / "retrieval" / "keys" / f"{safe_name(name)}.jsonl"

  def keys(self, name: str) -> list[dict[str, Any]]:
    """The stored training instances of `name`: [{"inputs", "answer_choices"?, ...}]."""
    path = self.keys_path(name)
    if not path.exists():
      raise LibraryError(f"{path}: expert {name!r} has no retrieval keys; add it with "
                         "`elm-jax library add --keys=auto|FILE` or ExpertLibrary.add(keys=...)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

  def embeddings_path(self, name: str, embedder: str, text_format: str) -> epath.Path:
    return self.root / "retrieval" / "embeddings" / embedder / text_format / f"{safe_name(name)}.npy"

  def _embedding_files(self, name: str) -> list[epath.Path]:
    base = self.root / "retrieval" / "embeddings"
    return list(base.glob(f"*/*/{safe_name(name)}.npy")) if base.exists() else []

  # ------------------------------------------------------------------ verification
  def verify(self, names: Optional[Sequence[str]] = None) -> list[str]:
    """Problems found (empty when every file matches its recorded size and sha256)."""
    manifest = self.manifest()
    problems = []
    for name in names or sorted(manifest["experts"]):
      entry = manifest["experts"].get(name)
      if entry is None:
        problems.append(f"{name}: not in the manifest")
        continue
      for file, recorded in entry["files"].items():
        path = self.root / entry["directory"] / file
        if not path.exists():
          problems.append(f"{path}: missing")
          continue
        digest, size = file_digest(path)
        if size != recorded["bytes"]:
          problems.append(f"{path}: {size} bytes, the manifest records {recorded['bytes']} (truncated or replaced)")
        elif digest != recorded["sha256"]:
          problems.append(f"{path}: sha256 {digest[:12]}..., the manifest records {recorded['sha256'][:12]}... (changed)")
    return problems


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)
