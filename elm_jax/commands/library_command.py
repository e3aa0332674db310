"""`elm-jax library add|list|show|remove|verify|export`: manage an Expert Library directory.

    elm-jax library add --library=LIB /tmp/run/experts/builtin_nli_can_we_infer ...
    elm-jax library add --library=LIB /tmp/run          # every expert a training run exported
    elm-jax library add --library=LIB --checkpoint=HF_T5 peft_lora_dir adapterhub_dir   # imported
    elm-jax library list --library=LIB
    elm-jax library verify --library=LIB                # exit 1 when a file changed
    elm-jax library verify --repair --library=LIB       # first finish interrupted removes
    elm-jax library export NAME OUT_DIR --format=peft --library=LIB   # or --format=adapters
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from elm_jax import files
from elm_jax.checkpoints import expert_files, hf, interchange
from elm_jax.commands import flags
from elm_jax.library.store import ExpertLibrary, LibraryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  add = sub.add_parser("add", help="copy trained experts into the library (creating it)")
  add.add_argument("experts", nargs="+",
                   help="expert directories, training run directories (their experts/ are added), or PEFT "
                        "(LoRA, IA3) and AdapterHub (bottleneck adapter) folders, imported")
  add.add_argument("--name", default=None,
                   help="library name of the expert (one expert only; default: its own, or an imported "
                        "folder's name)")
  add.add_argument("--checkpoint", default=None,
                   help="the Hugging Face T5 an imported PEFT or AdapterHub folder runs on (default: the "
                        "library's backbone)")
  add.add_argument("--keys", default="auto",
                   help="retrieval keys: 'auto' (100 training instances of the expert's task, seed 42; "
                        "none for an imported expert, which has no task of ours), 'none', or a JSONL file "
                        "of {inputs, answer_choices?}")
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
  export = sub.add_parser("export", help="write an expert as a PEFT (LoRA, IA3) or AdapterHub "
                                         "(bottleneck adapter) folder")
  export.add_argument("name")
  export.add_argument("out_dir", help="the folder to write (must not exist)")
  export.add_argument("--format", required=True, choices=interchange.FORMATS)
  export.add_argument("--base_model", default=None,
                      help="the base model the folder names (PEFT's base_model_name_or_path, AdapterHub's "
                           "model_name), e.g. google/flan-t5-large; default: the backbone checkpoint's path")
  export.add_argument("--checkpoint", default=None,
                      help="the backbone checkpoint (default: the one the expert or the library records)")
  for p in sub.choices.values():
    p.add_argument("--library", required=True, help="library directory (local path or any epath URL)")
  flags.add_integrity_flag(sub.choices["show"])


def main(args: argparse.Namespace) -> int:
  if args.action == "add":
    return _add(args)
  if args.action == "export":
    return _export(args)
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


def _add(args: argparse.Namespace) -> int:
  from elm_jax.library import adding  # lazily: SeqIO and TensorFlow, which only `add` needs
  adding.add_experts(args.library, args.experts, keys=args.keys, name=args.name, checkpoint=args.checkpoint,
                     setup=args.setup, log=print)
  return 0


def _export(args: argparse.Namespace) -> int:
  library = ExpertLibrary(args.library)
  params, meta = library.load(args.name)
  source = os.fspath(library.expert_dir(args.name) / expert_files.METADATA_FILE)
  checkpoint = (args.checkpoint or meta.training_config.get("backbone_checkpoint")
                or library.manifest().get("backbone_checkpoint"))
  hf_config, model_type = (hf.read_hf_config(checkpoint) if checkpoint and os.path.isfile(
      os.path.join(checkpoint, "config.json")) else (None, "t5"))
  model_config = expert_files.recorded_model_config(meta, source) or hf_config
  if model_config is None:
    raise LibraryError(f"{source}: records no backbone config (training_config.model); pass "
                       "--checkpoint=DIR, the Hugging Face checkpoint the expert was trained on")
  written = interchange.export_expert(params, meta, args.out_dir, args.format, model_config=model_config,
                                      base_model=args.base_model or checkpoint or "", model_type=model_type)
  print(f"wrote {args.out_dir} ({args.format}: {', '.join(written)}) from expert {args.name!r}")
  return 0
