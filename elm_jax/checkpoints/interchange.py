"""Experts to and from the folders other libraries share them in: PEFT (`peft_format`: LoRA and
IA3) and AdapterHub's `adapters` package (`adapters_format`: bottleneck adapters).

An import reads such a folder against the backbone it will run on (its `T5Config`) and writes an
elm_jax expert directory (`expert_files`): the converted tensors, an expert config of the kind
the folder's configuration describes, and `training_config` recording the backbone (`model`,
`backbone_checkpoint`) and where the expert came from (`imported`: format, source folder and its
original configuration). The tensors are checked like any expert's: exactly its kind's parameter
list on that backbone (`expert_files.check_tensors`), all finite. A configuration elm_jax's
model cannot compute exactly is refused, naming the file, the field and what was expected; so
is, on export, an expert the format cannot hold exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from typing import Iterator, Optional

import numpy as np

from elm_jax import tree_paths
from elm_jax.checkpoints import adapters_format, expert_files, loading, peft_format, t5x
from elm_jax.checkpoints.adapter_folders import CONFIG_FILE, InterchangeError, read_json_object, write_folder
from elm_jax.checkpoints.expert_files import ExpertMetadata
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.t5_config import T5Config

FORMATS = ("peft", "adapters")
READERS = {"peft": peft_format.read_peft, "adapters": adapters_format.read_adapters}


def folder_format(directory: str | os.PathLike) -> Optional[str]:
  """'peft' or 'adapters' for a folder whose adapter_config.json is PEFT's (a `peft_type`) or
  the `adapters` package's (a `config` object); None for anything else (an elm_jax expert)."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path) or os.path.isfile(os.path.join(os.fspath(directory), expert_files.METADATA_FILE)):
    return None
  raw = read_json_object(path)
  if "peft_type" in raw:
    return "peft"
  if isinstance(raw.get("config"), dict):
    return "adapters"
  raise InterchangeError(f"{path}: neither a PEFT adapter config (field 'peft_type') nor an "
                         "AdapterHub one (field 'config'); expected one of them")


def import_expert(directory: str, out_dir: str, *, model_config: T5Config, fingerprint: str,
                  backbone_checkpoint: str, name: Optional[str] = None) -> ExpertMetadata:
  """Converts the PEFT or AdapterHub folder `directory` into an elm_jax expert at `out_dir`
  (which must not exist) for the backbone `model_config` whose tensors hash to `fingerprint`;
  returns its metadata. Its name is `name` or the folder's name; its task `<format>:<folder
  name>` (an imported expert has no training task of ours)."""
  directory = os.path.abspath(os.fspath(directory))
  fmt = folder_format(directory)
  if fmt is None:
    raise InterchangeError(f"{directory}: not a PEFT or AdapterHub folder (no {CONFIG_FILE})")
  imported = READERS[fmt](directory, model_config)
  config = dataclasses.asdict(ExpertConfig(**imported.expert_config))
  folder = os.path.basename(directory.rstrip(os.sep))
  metadata = ExpertMetadata(
      name=name or folder, task=f"{fmt}:{folder}", expert_config=config, backbone_fingerprint=fingerprint,
      training_config={"model": dataclasses.asdict(model_config),
                       "backbone_checkpoint": os.path.abspath(backbone_checkpoint),
                       "imported": {"format": fmt, "source": directory, "config": imported.original_config}})
  expert_files.check_tensors(imported.tensors, metadata, f"{directory} (as a {config['kind']!r} expert)",
                             model_config)
  tree = tree_paths.unflatten({tree_paths.split(k): v for k, v in imported.tensors.items()})
  expert_files.save_expert(out_dir, tree, metadata)
  return metadata


def export_expert(params: dict, metadata: ExpertMetadata, directory: str, fmt: str, *,
                  model_config: T5Config, base_model: str, model_type: str = "t5") -> list[str]:
  """Writes the expert (`params`, its tree; `metadata`) as a `fmt` folder ('peft' or 'adapters')
  at `directory`, which must not exist, for the backbone `model_config` that `base_model` names
  (recorded as PEFT's base_model_name_or_path, AdapterHub's model_name); returns the files
  written. An expert the format cannot hold exactly is refused with the reason."""
  if fmt not in FORMATS:
    raise InterchangeError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
  flat = {tree_paths.join(p): np.asarray(v, np.float32) for p, v in tree_paths.flatten(params).items()}
  expert_config = ExpertConfig(**metadata.expert_config)
  source = f"expert {metadata.name!r}"
  if fmt == "peft":
    config, tensors = peft_format.to_peft(flat, expert_config, model_config, base_model, source)
    weights = peft_format.WEIGHTS_FILE
  else:
    config, tensors = adapters_format.to_adapters(flat, expert_config, model_config, source,
                                                  name=metadata.name, base_model=base_model,
                                                  model_type=model_type)
    weights = adapters_format.WEIGHTS_FILE
  write_folder(directory, config, tensors, weights)
  return [CONFIG_FILE, weights]


@contextlib.contextmanager
def converted(folder: str | os.PathLike, checkpoint: Optional[str], name: Optional[str] = None
              ) -> Iterator[tuple[str, ExpertMetadata]]:
  """(a temporary elm_jax expert directory holding the expert of the PEFT or AdapterHub
  `folder`, converted for the Hugging Face backbone `checkpoint`; its metadata), removed when
  the block ends: what `ExpertLibrary.add` copies in."""
  if not checkpoint:
    raise InterchangeError(f"{folder}: importing a PEFT or AdapterHub folder needs the backbone it runs on; "
                           "pass --checkpoint=DIR (a Hugging Face T5 directory)")
  model_config, fingerprint = backbone_identity(os.path.abspath(checkpoint), _stamp(checkpoint))
  with tempfile.TemporaryDirectory(prefix="elm_import.") as tmp:
    out = os.path.join(tmp, "expert")
    metadata = import_expert(os.fspath(folder), out, model_config=model_config, fingerprint=fingerprint,
                             backbone_checkpoint=checkpoint, name=name)
    yield out, metadata


def _stamp(checkpoint: str) -> tuple:
  """(name, size, modification time) of the checkpoint's files: a changed checkpoint is read again."""
  if not os.path.isdir(checkpoint):
    return ()
  return tuple((n, s.st_size, s.st_mtime_ns) for n in sorted(os.listdir(checkpoint))
               for s in (os.stat(os.path.join(checkpoint, n)),))


@functools.lru_cache(maxsize=4)
def backbone_identity(checkpoint: str, stamp: tuple = ()) -> tuple[T5Config, str]:
  """(T5Config, fingerprint) of the backbone checkpoint at `checkpoint` (read once per `stamp`
  of its files, so importing many folders reads it once)."""
  del stamp  # part of the cache key only
  if not os.path.isdir(checkpoint):
    raise InterchangeError(f"{checkpoint}: the backbone checkpoint directory (--checkpoint) is not there")
  if t5x.detect_checkpoint_format(checkpoint) != "hf":
    raise InterchangeError(f"{checkpoint}: not a Hugging Face checkpoint (config.json and safetensors "
                           "weights); PEFT and AdapterHub folders are imported onto the Hugging Face T5 "
                           "they were trained on")
  loaded = loading.load_model_checkpoint(checkpoint)
  return loaded.config, expert_files.backbone_fingerprint(loaded.params)
