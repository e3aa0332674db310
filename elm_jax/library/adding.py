"""Adding experts to a library from directories on disk (what `elm-jax library add` and
`api.add_experts` run).

The arguments may name expert directories (`tensors.safetensors` + `expert.json`), training run
directories (every expert under their experts/) or PEFT and AdapterHub folders (imported for the
library's backbone). Every expert directory's tensors are checked before the library is made;
retrieval keys are read (a keys file, or 100 training instances of each expert's task) and
stored beside each expert. A library this call made, that its failed adds left empty, is
removed.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from etils import epath

from elm_jax import jsonl
from elm_jax.checkpoints import expert_files, interchange
from elm_jax.library.store import ExpertLibrary, LibraryError, check_keys
from tasks import instances


def expert_dirs(paths: Sequence[str | os.PathLike]) -> list[str]:
  """Expert directories from arguments that may also be training run directories (any epath)
  or PEFT and AdapterHub folders (local)."""
  found = []
  for path in map(epath.Path, paths):
    if (path / expert_files.METADATA_FILE).is_file() or interchange.folder_format(path) is not None:
      found.append(os.fspath(path))
    elif (path / "experts").is_dir():
      inside = sorted(os.fspath(d) for d in (path / "experts").iterdir()
                      if (d / expert_files.METADATA_FILE).is_file())
      if not inside:
        raise LibraryError(f"{path}/experts: holds no expert directories")
      found.extend(inside)
    else:
      raise LibraryError(f"{path}: neither an expert directory ({expert_files.METADATA_FILE}), a training "
                         f"run directory (experts/), nor a PEFT or AdapterHub folder ({interchange.CONFIG_FILE})")
  return found


def retrieval_keys(option: str, task: str) -> Optional[list]:
  """The retrieval keys `option` asks for: None for 'none', 100 training instances of `task`
  (seed 42) for 'auto', else the {inputs, answer_choices?} records of the JSONL file it names."""
  if option == "none":
    return None
  if option != "auto":
    return check_keys(jsonl.read_objects(option, "--keys"), option)
  instances.ensure_registered([task])  # a no-op once the task is registered
  return instances.training_keys(task)


def add_experts(library_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], *, keys: str = "auto",
                name: Optional[str] = None, checkpoint: Optional[str] = None, setup: Optional[str] = None,
                log: Callable[[str], None] = lambda line: None) -> list[str]:
  """Copies the experts `paths` lead to (`expert_dirs`) into the library at `library_dir`
  (made when missing) and returns their names there, in order. `keys`: 'auto', 'none' or a
  JSONL file (`retrieval_keys`; an imported expert has no task of ours, so 'auto' gives it
  none); `name`: the library name of the one expert given; `checkpoint`: the backbone an
  imported folder is converted for (default: the library's); `setup`: tasks to register first.
  `log` gets one line per expert added or skipped (already there with the same files), and a
  line per interrupted removal finished first."""
  instances.register_setup(setup)
  dirs = expert_dirs(paths)
  if name and len(dirs) != 1:
    raise LibraryError(f"--name: names one expert, but {len(dirs)} were given")
  formats = [interchange.folder_format(d) for d in dirs]
  # Every tensor of an expert directory is checked before the library is made; an imported
  # folder is checked as it is converted, and a library its failed add made is removed.
  metas = [None if fmt else expert_files.check_expert(d) for d, fmt in zip(dirs, formats)]
  names = [name or (meta.name if meta else os.path.basename(os.path.normpath(d)))
           for d, meta in zip(dirs, metas)]
  expert_files.directory_names(names, "--name" if name else "expert names")
  if keys not in ("auto", "none"):
    retrieval_keys(keys, "")  # a bad keys file is refused before anything is written
  library = ExpertLibrary(library_dir, create=True)
  try:
    for done in library.repair("add experts"):  # a killed remove is finished first
      log(done)
    for directory, meta, expert_name, fmt in zip(dirs, metas, names, formats):
      log(_add_one(library, directory, meta, expert_name, fmt, keys, checkpoint))
  except Exception:
    library.discard_if_unused()  # a library this call made, that its failed adds left empty
    raise
  return names


def _add_one(library: ExpertLibrary, directory: str, meta: Optional[expert_files.ExpertMetadata],
             name: str, fmt: Optional[str], keys: str, checkpoint: Optional[str]) -> str:
  """Adds one expert directory (`meta` its checked metadata) or imported folder (`fmt` its
  format) as `name`; returns the line that says what was done."""
  if fmt is None and library.holds_identical(name, directory):
    return f"already in the library: {name} (same files; skipped)"
  expert_keys = None if fmt and keys == "auto" else retrieval_keys(keys, meta.task if meta else "")
  before = library.manifest()["experts"].get(name)
  library.add(directory, name=name, keys=expert_keys, checkpoint=checkpoint)
  count = len(expert_keys) if expert_keys else 0
  if fmt is None:
    return f"added {name} ({meta.task}; {count} retrieval keys)"
  if before is not None and before == library.entry(name):
    return f"already in the library: {name} (imported from {directory}; same files; skipped)"
  return (f"added {name} (imported {library.entry(name)['kind']} expert from the {fmt} folder "
          f"{directory}; {count} retrieval keys"
          + ("; --keys=auto gives none: pass --keys=FILE.jsonl" if keys == "auto" else "") + ")")
