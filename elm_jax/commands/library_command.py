"""`elm-jax library add|list|show|remove|verify`: manage an Expert Library directory.

    elm-jax library add --library=LIB /tmp/run/experts/builtin_nli_can_we_infer ...
    elm-jax library add --library=LIB /tmp/run          # every expert a training run exported
    elm-jax library list --library=LIB
    elm-jax library verify --library=LIB                # exit 1 when a file changed
    elm-jax library verify --repair --library=LIB       # first finish interrupted removes
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from etils import epath

from elm_jax import files, jsonl
from elm_jax.checkpoints import expert_files
from elm_jax.commands import flags
from elm_jax.library.store import ExpertLibrary, LibraryError, check_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  add = sub.add_parser("add", help="copy trained experts into the library (creating it)")
  add.add_argument("experts", nargs="+",
                   help="expert directories, or training run directories (their experts/ are added)")
  add.add_argument("--name", default=None, help="library name of the expert (one expert only)")
  add.add_argument("--keys", default="auto",
                   help="retrieval keys: 'auto' (100 training instances of the expert's task, seed 42), "
                        "'none', or a JSONL file of {inputs, answer_choices?}")
  add.add_argument("--setup", default=None,
                   help="tasks to register first: builtin, elm, or module:function (comma-separated)")
  for name, help_text in (("list", "the experts, one line each"), ("show", "one expert's entry"),
                          ("remove", "delete an expert, its keys and embeddings"),
                          ("verify", "check every file against its recorded size and sha256")):
    p = sub.add_parser(name, help=help_text)
    if name in ("show", "remove"):
      p.add_argument("name")
    if name == "verify":
      p.add_argument("names", nargs="*")
      p.add_argument("--repair", action="store_true",
                     help="first finish what a killed `library remove` or `library add` left "
                          "(pending removals are completed), then verify")
  for p in sub.choices.values():
    p.add_argument("--library", required=True, help="library directory (local path or any epath URL)")
  flags.add_integrity_flag(sub.choices["show"])


def expert_dirs(paths) -> list[str]:
  """Expert directories from arguments that may also be training run directories (any epath)."""
  found = []
  for path in map(epath.Path, paths):
    if (path / expert_files.METADATA_FILE).is_file():
      found.append(os.fspath(path))
    elif (path / "experts").is_dir():
      inside = sorted(os.fspath(d) for d in (path / "experts").iterdir()
                      if (d / expert_files.METADATA_FILE).is_file())
      if not inside:
        raise LibraryError(f"{path}/experts: holds no expert directories")
      found.extend(inside)
    else:
      raise LibraryError(f"{path}: neither an expert directory ({expert_files.METADATA_FILE}) nor a "
                         "training run directory (experts/)")
  return found


def _keys_for(option: str, task: str) -> list | None:
  if option == "none":
    return None
  if option != "auto":
    return check_keys(jsonl.read_objects(option, "--keys"), option)
  from tasks import instances  # lazily: SeqIO and TensorFlow, which only `add --keys=auto` needs
  instances.ensure_registered([task])  # a no-op once the task is registered
  return instances.training_keys(task)


def main(args: argparse.Namespace) -> int:
  if args.action == "add":
    from tasks import instances  # lazily, as in _keys_for
    instances.register_setup(args.setup)
    dirs = expert_dirs(args.experts)
    if args.name and len(dirs) != 1:
      raise LibraryError(f"--name: names one expert, but {len(dirs)} were given")
    metas = [expert_files.check_expert(d) for d in dirs]  # every tensor checked before the library is made
    names = [args.name or meta.name for meta in metas]
    expert_files.directory_names(names, "--name" if args.name else "expert names")
    if args.keys not in ("auto", "none"):
      _keys_for(args.keys, metas[0].task)  # a bad keys file is refused before anything is written
    library = ExpertLibrary(args.library, create=True)
    try:
      for done in library.repair("add experts"):  # a killed remove is finished first
        print(done)
      for directory, meta, name in zip(dirs, metas, names):
        if library.holds_identical(name, directory):
          print(f"already in the library: {name} (same files; skipped)")
          continue
        keys = _keys_for(args.keys, meta.task)
        library.add(directory, name=name, keys=keys)
        print(f"added {name} ({meta.task}; {len(keys) if keys else 0} retrieval keys)")
    except Exception:
      library.discard_if_unused()  # a library this command made, that its failed adds left empty
      raise
    return 0
  library = ExpertLibrary(args.library)
  if args.action == "list":
    manifest = library.manifest()
    for name, entry in sorted(manifest["experts"].items()):
      print(f"{name}\t{entry['kind']}\t{entry['task']}\tsteps={entry['steps']}\t"
            f"keys={'yes' if entry.get('keys') else 'no'}")
    print(f"{len(manifest['experts'])} expert(s); backbone {manifest['backbone_fingerprint']}",
          file=sys.stderr)
  elif args.action == "show":
    entry = library.entry(args.name)
    if args.skip_integrity_check:
      files.warn_unchecked(f"expert {args.name!r}")
    meta = expert_files.load_metadata(os.fspath(library.expert_dir(args.name)), recorded=entry["files"],
                                      what=f"expert {args.name!r}",
                                      check_integrity=not args.skip_integrity_check)
    print(json.dumps({"entry": entry, "metadata": meta.__dict__}, indent=1, sort_keys=True, default=str))
  elif args.action == "remove":
    if library.remove(args.name):
      print(f"removed {args.name}")
    else:
      print(f"already removed: {args.name} (the history's last record of it is its removal)")
  elif args.action == "verify":
    if args.repair:
      for done in library.repair():
        print(done)
    problems = library.verify(args.names or None)
    for problem in problems:
      print(problem)
    checked = len(args.names) if args.names else len(library.names())
    print(f"verified {checked} expert(s): {'OK' if not problems else f'{len(problems)} problem(s)'}",
          file=sys.stderr)
    return 1 if problems else 0
  return 0
