"""PHATGOOSE gates of a library's experts (Muqeeth et al. 2024): trained after each expert, the
expert frozen (`training/gates.py`), and kept beside it.

Each expert's gates live in `experts/<name>/gates.safetensors` (one float32 vector [in] per
routed module, named by the module's path: `encoder/layers_0/mlp` for an adapter's sub-layer,
`encoder/layers_0/attention/query` for a LoRA projection; the training settings and final
metrics as JSON in the file's metadata), recorded in the expert's manifest entry as `gates_file`
{sha256, bytes}, as its keys file is. The expert's own files are never changed (their hashes,
and `library add` of the same expert again, are as before); `library verify` checks the gates
file against its record, loading checks it as it reads it, and `library remove` removes it with
the expert's directory. The gates file lives in the expert's directory so that nothing else
in the library has to know about it.

Gates are written once: `train_gates` skips the experts that have gates. All the experts a run
trains are written first and recorded in one manifest write, so a run killed at any moment,
started again with the same arguments, resumes its checkpoints (`training/gates.py`) and
records every expert's gates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from elm_jax import defaults, files, partitioning
from elm_jax.library import loaded as library_loaded
from elm_jax.library.paths import GATES_FILE, LibraryError
from elm_jax.library.store import ExpertLibrary
from elm_jax.training import gates as gate_training
from elm_jax.training.config import TrainConfig
from tasks import instances

METADATA_KEY = "elm_jax_gates"


@dataclasses.dataclass(frozen=True)
class GatesResult:
  """What `train_gates` did: the experts whose gates it trained and recorded, those it skipped
  (they had gates), and the trained experts' final metrics (loss, accuracy, ...; {} for a run
  that had finished before)."""
  trained: tuple[str, ...]
  skipped: tuple[str, ...]
  metrics: dict[str, dict[str, float]]


def has_gates(library: ExpertLibrary, name: str) -> bool:
  """Whether the manifest records gates for expert `name`."""
  return bool(library.entry(name).get("gates_file"))


def load_gates(library: ExpertLibrary, name: str) -> Optional[dict[str, np.ndarray]]:
  """Expert `name`'s gates {module path: [in] float32}, checked against the manifest's sha256
  as they are read (unless the library was opened without checks); None when it has none."""
  entry = library.entry(name)
  recorded = entry.get("gates_file")
  if not recorded:
    return None
  path = library._path(f"{entry['directory']}/{GATES_FILE}", f"read the gates of {name!r}")
  try:
    data = files.read_verified(path, recorded["sha256"], recorded["bytes"], f"gates of expert {name!r}",
                               check=library.check_integrity)
  except files.FileCheckError as e:
    raise LibraryError(str(e)) from None
  try:
    tensors = load_safetensors(data)
  except Exception as e:  # safetensors raises its own error type for damaged files
    raise LibraryError(f"{path}: not a readable safetensors file ({e})") from None
  for key, value in tensors.items():
    if value.ndim != 1 or value.dtype != np.float32 or not np.all(np.isfinite(value)):
      raise LibraryError(f"{path}: gate {key!r} must be a finite float32 vector, got {value.dtype} "
                         f"{list(value.shape)}")
  return dict(tensors)


def _record(library: ExpertLibrary, gates: Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]) -> None:
  """Writes each named expert's gates file ({name: (gates, info)}; info goes in the file's
  metadata), then records all of them in one manifest write, under the writers' lock. A write
  that fails leaves no file this call made."""
  with library._lock():
    manifest = library.manifest()
    made = []
    try:
      for name, (tensors, info) in gates.items():
        entry = library._entry(name, manifest["experts"])
        purpose = f"write the gates of {name!r}"
        library._directory(name, entry, purpose)
        path = library._path(f"{entry['directory']}/{GATES_FILE}", purpose)
        data = save_safetensors({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())},
                                metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
        if not os.path.lexists(os.fspath(path)):
          made.append(path)
        files.write_atomically(path, data)
        digest, size = files.digest_file(path)
        entry["gates_file"] = {"sha256": digest, "bytes": size}
      library._write_manifest(manifest)
    except (files.FileCheckError, OSError) as e:
      for path in made:
        path.unlink(missing_ok=True)
      raise LibraryError(f"{e}; no gates were recorded in {library.root}") from None


def train_gates(library_dir: str, model_dir: str, experts: str | Sequence[str] = "all", *,
                steps: int = gate_training.GATE_STEPS, learning_rate: float = gate_training.GATE_LEARNING_RATE,
                batch_size: int = 8, input_length: int = defaults.TRAIN_INPUT_LENGTH,
                target_length: int = defaults.TRAIN_TARGET_LENGTH, seed: int = defaults.SEED,
                save_every: int = 100, tasks: Optional[Mapping[str, str]] = None,
                checkpoint: Optional[str] = None, check_integrity: bool = True, config=None,
                on_step: Optional[Callable[[int], None]] = None,
                mesh_config: Optional[partitioning.MeshConfig] = None) -> GatesResult:
  """Trains the PHATGOOSE gates of the library's `experts` ('all', 'a,b' or a list) that have
  none, all in one vmapped program, each on its own training task (its expert.json's `task`,
  or `tasks[name]`; a registered SeqIO task) for `steps` steps of `batch_size` rows cut to
  `input_length`/`target_length`, AdamW at `learning_rate` decayed linearly, gates from 0; the
  run's checkpoints go to `model_dir` (started again with the same arguments, a killed run
  resumes there) and the gates into the library (module docstring). `checkpoint`/`config`:
  the backbone, as `load_experts` takes them. `mesh_config`: the mesh the run splits over (the
  experts on its `expert` axis, as `train` splits them; None: one device). Returns a GatesResult."""
  library = ExpertLibrary(library_dir, check_integrity=check_integrity)
  names = library.resolve(experts)
  todo = [n for n in names if not has_gates(library, n)]
  skipped = tuple(n for n in names if n not in todo)
  if not todo:
    return GatesResult((), skipped, {})
  loaded = library_loaded.load_experts(library_dir, todo, checkpoint=checkpoint, check_integrity=check_integrity,
                                       config=config)
  expert_tasks = []
  for name, metadata in zip(todo, loaded.metadata):
    task = (tasks or {}).get(name) or metadata.task
    if not task:
      raise LibraryError(f"expert {name!r} records no training task (an imported expert?); gates train on "
                         "the expert's own task: pass tasks={name: TASK} (--tasks=NAME=TASK)")
    expert_tasks.append(task)
  instances.ensure_registered(expert_tasks)
  run = TrainConfig(model_dir=model_dir, expert_tasks=tuple(expert_tasks), steps=steps, batch_size=batch_size,
                    input_length=input_length, target_length=target_length, expert_names=tuple(todo), seed=seed,
                    save_every=min(save_every, steps), log_every=min(10, steps))
  optimizer = gate_training.gate_optimizer(learning_rate)
  trained, metrics = gate_training.train_gates(run, loaded.model, loaded.backbone, loaded.stack.params,
                                               optimizer_config=optimizer, on_step=on_step,
                                               partitioner=None if mesh_config is None
                                               else partitioning.Partitioner(mesh_config))
  settings = {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "input_length": input_length,
              "target_length": target_length, "seed": seed, "init": "zeros"}
  _record(library, {name: (g, {**settings, "task": task, "metrics": metrics.get(name, {})})
                    for name, task, g in zip(todo, expert_tasks, trained)})
  return GatesResult(tuple(todo), skipped, metrics)
