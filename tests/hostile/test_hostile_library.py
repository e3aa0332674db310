"""Hostile cases of the Expert Library on disk (issue 27): symbolic links planted inside a
library (which lives on shared disks and buckets) must never become a way to read, write or
delete outside it; manifest entries that share a directory or a keys file, or a name given
twice, are refused when the manifest is read; a `library remove` interrupted by a kill is
reported by `verify` with the way to finish it; a full disk (a real tmpfs filled to the last
page, or to the room for some of the writes) under `library add` or `remove` fails with one
line naming the file, the expert and the library, and leaves the library as it was.

Each case runs in a fresh world (`tests/hostile/harness.py`): the "outside" directories a link
points to lie inside the world, so the snapshot proves that nothing out there was created,
changed or deleted. `paths.py`'s module docstring states the rule: a library holds no symbolic
links below its root, and every operation refuses to go through one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from elm_jax.library import paths
from tests.hostile.harness import TASKS, Case, World, lib_arg, run_case

A, B = TASKS  # the two experts of the prepared library
KEYS_FILE = os.path.join("retrieval", "keys", f"{A}.jsonl")


def _lib(w: World, *parts) -> str:
  return os.path.join(w.library(), *parts)


def _move_out(w: World, relative: str, outside: str = "outside") -> str:
  """Moves LIB/relative to the world's `outside` path and leaves a symbolic link to it in its
  place; returns the outside path."""
  target = w.path(outside)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(_lib(w, relative), target)
  os.symlink(target, _lib(w, relative))
  return target


def _link(w: World, relative: str, target: str) -> None:
  """Replaces LIB/relative (file or directory, if any) by a symbolic link to `target`."""
  path = _lib(w, relative)
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.unlink(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.symlink(target, path)


def _copy_out(w: World, relative: str) -> None:
  """Copies LIB/relative out of the library (same bytes, so its sha256 still matches) and
  links the library's path to the copy."""
  outside = w.path("outside", os.path.basename(relative))
  os.makedirs(os.path.dirname(outside), exist_ok=True)
  shutil.copyfile(_lib(w, relative), outside)
  _link(w, relative, outside)


def _outside_embeddings(w: World) -> None:
  """retrieval/embeddings -> an outside directory that holds a file of the name `remove A`
  deletes."""
  w.write(os.path.join("outside", "t5", "label_instance", f"{A}.npy"), b"not the library's")
  _link(w, os.path.join("retrieval", "embeddings"), w.path("outside"))


def _duplicate_name(w: World) -> None:
  """manifest.json written by hand with expert A's name twice (B's entry under A's name)."""
  path = _lib(w, "manifest.json")
  manifest = json.load(open(path))
  experts = manifest.pop("experts")
  head = json.dumps(manifest)[:-1]
  body = ", ".join(f"{json.dumps(name)}: {json.dumps(entry)}"
                   for name, entry in [(A, experts[A]), (A, experts[B])])
  open(path, "w").write(f"{head}, \"experts\": {{{body}}}}}")


def _shared_directory(w: World) -> None:
  w.manifest(lambda m: m["experts"][B].update(directory=m["experts"][A]["directory"]))


def _shared_keys_file(w: World) -> None:
  """B's entry renamed to 'builtin/sentiment_is_positive', whose keys file is A's."""
  w.manifest(lambda m: m["experts"].update({"builtin/sentiment_is_positive": m["experts"].pop(B)}))


def _pending_removal(w: World) -> None:
  """The state a kill leaves in `library remove A` after A's files moved to the trash and
  before the manifest update (its record written first)."""
  lib = w.library()
  manifest = json.load(open(os.path.join(lib, "manifest.json")))
  trash = os.path.join(lib, paths.TRASH_DIR, f"{A}.{'d' * 32}")
  os.makedirs(trash)
  with open(os.path.join(trash, paths.REMOVAL_RECORD), "w") as f:
    json.dump({"name": A, "id": "d" * 32, "entry": manifest["experts"][A]}, f)
  os.rename(os.path.join(lib, "experts", A), os.path.join(trash, "expert"))


LINK_OUT = r"is a symbolic link that resolves to .*outside.*, outside the library .*lib; refusing to "

CASES = [
    # ------------------------------------------------------------------ links out of the library
    Case("library remove: retrieval/keys a symlink to a directory outside (used to delete the file there)",
         lambda w: (_move_out(w, os.path.join("retrieval", "keys")), ["library", "remove", lib_arg(w), A])[1],
         message=r"lib/retrieval/keys: " + LINK_OUT + r"remove expert 'builtin_sentiment_is_positive'"),
    Case("library remove: retrieval/embeddings a symlink to a directory outside",
         lambda w: (_outside_embeddings(w), ["library", "remove", lib_arg(w), A])[1],
         message=r"lib/retrieval/embeddings: " + LINK_OUT + "remove expert"),
    Case("library remove: retrieval/ a symlink to a directory outside",
         lambda w: (_move_out(w, "retrieval"), ["library", "remove", lib_arg(w), A])[1],
         message=r"lib/retrieval: " + LINK_OUT + "remove expert"),
    Case("library remove: an embedder directory retrieval/embeddings/t5 a symlink outside",
         lambda w: (w.write(os.path.join("outside", "label_instance", f"{A}.npy"), b"x"),
                    _link(w, os.path.join("retrieval", "embeddings", "t5"), w.path("outside")),
                    ["library", "remove", lib_arg(w), A])[2],
         message=r"lib/retrieval/embeddings/t5: " + LINK_OUT + "remove expert"),
    Case("library add: experts/ a symlink to a directory outside (used to write the expert there)",
         lambda w: (_move_out(w, "experts"),
                    ["library", "add", lib_arg(w), "--keys=none", "--name=third",
                     os.path.join(w.run_dir(), "experts", A)])[1],
         message=r"lib/experts: " + LINK_OUT + "add experts through it"),
    Case("library add: retrieval/keys a symlink to a directory outside (used to write the keys there)",
         lambda w: (_move_out(w, os.path.join("retrieval", "keys")),
                    ["library", "add", lib_arg(w), "--name=third", "--keys=" + w.write("k.jsonl", '{"inputs": "a"}\n'),
                     os.path.join(w.run_dir(), "experts", A)])[1],
         message=r"lib/retrieval/keys: " + LINK_OUT + "add expert 'third' through it"),
    Case("library remove: history.jsonl a symlink to a file outside (used to append there)",
         lambda w: (_copy_out(w, "history.jsonl"), ["library", "remove", lib_arg(w), A])[1],
         message=r"lib/history.jsonl: " + LINK_OUT + "append to the history"),
    Case("library remove: .lock a symlink to a missing file outside (used to create it there)",
         lambda w: (os.makedirs(w.path("outside")), _link(w, ".lock", w.path("outside", "lock")),
                    ["library", "remove", lib_arg(w), A])[2],
         message=r"lib/\.lock: " + LINK_OUT + "take the library's lock"),
    Case("library add: .lock a symlink to a missing file outside",
         lambda w: (os.makedirs(w.path("outside")), _link(w, ".lock", w.path("outside", "lock")),
                    ["library", "add", lib_arg(w), "--keys=none", "--name=third",
                     os.path.join(w.run_dir(), "experts", A)])[2],
         message=r"lib/\.lock: " + LINK_OUT + "take the library's lock"),
    Case("library list: manifest.json a symlink to a file outside",
         lambda w: (_copy_out(w, "manifest.json"), ["library", "list", lib_arg(w)])[1],
         message=r"lib/manifest.json: " + LINK_OUT + "read the manifest"),
    Case("library show: an expert's expert.json a symlink to a copy outside (same sha256)",
         lambda w: (_copy_out(w, os.path.join("experts", A, "expert.json")), ["library", "show", lib_arg(w), A])[1],
         message=r"lib/experts/builtin_sentiment_is_positive/expert.json: " + LINK_OUT + "load expert"),
    Case("retrieve: a keys file a symlink to a copy outside (same sha256)",
         lambda w: (_copy_out(w, KEYS_FILE),
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=bm25"])[1],
         message=r"lib/retrieval/keys/builtin_sentiment_is_positive.jsonl: " + LINK_OUT + "read the retrieval keys"),
    Case("retrieve: retrieval/embeddings a symlink outside (used to write the embedding cache there)",
         lambda w: (os.makedirs(w.path("outside")), _link(w, os.path.join("retrieval", "embeddings"), w.path("outside")),
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=t5"])[2],
         message=r"lib/retrieval/embeddings: " + LINK_OUT + "use the embedding cache"),
    Case("library remove: the trash directory .trash a symlink outside",
         lambda w: (os.makedirs(w.path("outside")), _link(w, paths.TRASH_DIR, w.path("outside")),
                    ["library", "remove", lib_arg(w), A])[2],
         message=r"lib/\.trash: " + LINK_OUT + "remove expert"),
    Case("library add: a staged leftover of a dead add that is a symlink outside (rmtree'd through)",
         lambda w: (w.write("outside/precious", "keep"),
                    _link(w, os.path.join("experts", f".x.{paths.host()}.999999999.{'a' * 32}.tmp"), w.path("outside")),
                    ["library", "add", lib_arg(w), "--keys=none", "--name=third",
                     os.path.join(w.run_dir(), "experts", A)])[2],
         message=r"\.x\..*\.tmp: " + LINK_OUT + "add experts through it"),
    Case("library verify: a symlink planted in the library is reported",
         lambda w: (_outside_embeddings(w), ["library", "verify", lib_arg(w)])[1],
         status=1, stdout=r"lib/retrieval/embeddings: is a symbolic link that resolves to .*outside"),
    # ------------------------------------------------------------------ links inside the library
    Case("library remove: an expert directory that is a symlink to another expert's",
         lambda w: (_link(w, os.path.join("experts", A), B), ["library", "remove", lib_arg(w), A])[1],
         message=r"lib/experts/builtin_sentiment_is_positive: is a symbolic link to .*builtin_topic_which_topic "
                 r"inside the library; refusing to remove expert 'builtin_sentiment_is_positive' through it"),
    Case("score: an expert's tensors a symlink to another file inside the library",
         lambda w: (shutil.copyfile(_lib(w, "experts", A, "tensors.safetensors"), _lib(w, "experts", "copy")),
                    _link(w, os.path.join("experts", A, "tensors.safetensors"), "../copy"),
                    ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"])[2],
         message=r"tensors.safetensors: is a symbolic link to .*experts/copy inside the library"),
    # ------------------------------------------------------------------ manifest entries that collide
    Case("library remove: two manifest entries naming one directory (used to delete the other's files)",
         lambda w: (_shared_directory(w), ["library", "remove", lib_arg(w), B])[1],
         message=r"manifest.json: experts\['builtin_sentiment_is_positive'\] and experts\['builtin_topic_which_topic'\] "
                 r"both name the directory 'experts/builtin_sentiment_is_positive'"),
    Case("library remove: a manifest directory 'experts/.' (used to delete every expert)",
         lambda w: (w.manifest(lambda m: m["experts"][A].update(directory="experts/.")),
                    ["library", "remove", lib_arg(w), A])[1],
         message=r"experts\['builtin_sentiment_is_positive'\].directory: 'experts/\.' does not name an expert directory"),
    Case("library verify: two manifest entries naming one directory",
         lambda w: (_shared_directory(w), ["library", "verify", lib_arg(w)])[1],
         message=r"both name the directory 'experts/builtin_sentiment_is_positive'"),
    Case("library remove: two manifest entries sharing one keys file (used to delete the other's keys)",
         lambda w: (_shared_keys_file(w), ["library", "remove", lib_arg(w), "builtin/sentiment_is_positive"])[1],
         message=r"experts\['builtin/sentiment_is_positive'\] and experts\['builtin_sentiment_is_positive'\] both "
                 r"map to the keys file retrieval/keys/builtin_sentiment_is_positive.jsonl"),
    Case("library verify: an expert name given twice in manifest.json (the second used to win)",
         lambda w: (_duplicate_name(w), ["library", "verify", lib_arg(w)])[1],
         message=r"manifest.json: the key 'builtin_sentiment_is_positive' appears twice in one object"),
    Case("library list: an expert name given twice in manifest.json",
         lambda w: (_duplicate_name(w), ["library", "list", lib_arg(w)])[1],
         message=r"the key 'builtin_sentiment_is_positive' appears twice"),
    # ------------------------------------------------------------------ an interrupted remove
    Case("library verify: a remove killed after moving the expert to the trash is reported, with the repair",
         lambda w: (_pending_removal(w), ["library", "verify", lib_arg(w)])[1],
         status=1, stdout=r"^[^\n]*\.trash/builtin_sentiment_is_positive\.d{32}: an interrupted `library remove` of "
                          r"'builtin_sentiment_is_positive'.*`elm-jax library verify --repair"),
    Case("score: an expert whose remove was interrupted is named as such",
         lambda w: (_pending_removal(w), ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"])[1],
         message=r"expert 'builtin_sentiment_is_positive': an interrupted `library remove` of it is pending"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_library(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)


# ---------------------------------------------------------------------------- full disks
_MOUNTS: list[str] = []  # tmpfs mounts made by this module's cases (unmounted after each)
PAGE = 4096


@pytest.fixture(autouse=True)
def _unmount():
  yield
  while _MOUNTS:
    mount = _MOUNTS.pop()
    if subprocess.run(["umount", mount], capture_output=True).returncode:
      subprocess.run(["umount", "-l", mount], capture_output=True)


def _disk(w: World, free_pages=lambda disk: 0, library: bool = True) -> str:
  """A small tmpfs mounted at WORLD/disk (the case is skipped where mounting is not allowed)
  holding a copy of the prepared library (`library`), then filled by a filler file so that
  `free_pages(disk)` pages (of 4 kB) are left: a real full disk, or one with exactly that room."""
  disk = w.path("disk")
  os.makedirs(disk)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=755", "tmpfs", disk],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()})")
  _MOUNTS.append(disk)
  if library:
    shutil.copytree(w.library(), os.path.join(disk, "lib"))
  filler = os.path.join(disk, "filler")
  descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    while True:
      os.write(descriptor, b"\0" * PAGE)
  except OSError as e:
    assert e.errno == errno.ENOSPC, e
  finally:
    os.close(descriptor)
  os.truncate(filler, os.path.getsize(filler) - free_pages(disk) * PAGE)
  return disk


def _pages(path: str) -> int:
  return -(-os.path.getsize(path) // PAGE)


def _room_for_the_expert(disk: str) -> int:
  """Pages for the copy of expert A's two files: the add then fails at its history line or
  its manifest, after the expert's directory is renamed into place."""
  expert = os.path.join(disk, "lib", "experts", A)
  return sum(_pages(os.path.join(expert, f)) for f in ("tensors.safetensors", "expert.json"))


def _add_third(w: World, library: str) -> list[str]:
  return ["library", "add", f"--library={library}", "--keys=none", "--name=third",
          os.path.join(w.run_dir(), "experts", A)]


NOT_REMOVED = rf"; expert '{A}' was not removed; the library .*disk/lib is as it was$"
NOT_ADDED = r"; expert 'third' was not added to the library .*disk/lib \(nothing of it is left\)$"
DISK_CASES = [
    Case("library add: a full disk names the file in the library, the expert and the library (used to "
         "name the staging directory)",
         lambda w: (_disk(w), _add_third(w, w.path("disk", "lib")))[1],
         message=r"disk/lib/experts/third/tensors\.safetensors: no space left on device writing [\d.]+ "
                 r"(bytes|kB|MB)" + NOT_ADDED),
    Case("library add: room for the expert's files but not its records puts the renamed expert back",
         lambda w: (_disk(w, _room_for_the_expert), _add_third(w, w.path("disk", "lib")))[1],
         message=r"disk/lib/(history\.jsonl|manifest\.json): no space left on device writing [\d.]+ "
                 r"(bytes|kB)(; the old file is kept)?" + NOT_ADDED),
    Case("library add: a full disk under a new library leaves no directory or lock (used to leave both)",
         lambda w: (_disk(w, library=False), _add_third(w, w.path("disk", "new", "lib")))[1],
         message=r"disk/new/lib/manifest\.json: no space left on device writing \d+ bytes; nothing was "
                 r"written; the library .*disk/new/lib was not created$"),
    Case("library add: room for a new library but not the expert leaves no library (used to leave an "
         "empty one)",
         lambda w: (_disk(w, lambda disk: 1, library=False), _add_third(w, w.path("disk", "new", "lib")))[1],
         message=r"disk/new/lib/experts/third/tensors\.safetensors: no space left on device"),
    Case("library remove: one page left fails at the history or manifest and puts the expert back "
         "(used to leave it in .trash)",
         lambda w: (_disk(w, lambda disk: 1), ["library", "remove", f"--library={w.path('disk', 'lib')}", A])[1],
         message=r"disk/lib/(history\.jsonl|manifest\.json): no space left on device writing [\d.]+ "
                 r"(bytes|kB)(; the old file is kept)?" + NOT_REMOVED),
]


@pytest.mark.parametrize("case", DISK_CASES, ids=[c.name for c in DISK_CASES])
def test_full_disk_under_the_library(case: Case, made, tmp_path, capsys):
  """A write of `library add` or `remove` failing on a real full disk: one line naming the
  file, the bytes, the expert and the library; every file as it was and nothing new left."""
  run_case(case, made, tmp_path, capsys)


def _library_state(lib) -> dict:
  """Every file of a library but its times: relative path -> bytes (manifest and history
  without their times)."""
  out = {}
  for base, dirs, names in os.walk(lib):
    for name in names:
      path = os.path.join(base, name)
      rel = os.path.relpath(path, lib)
      if rel == "manifest.json":
        manifest = json.load(open(path))
        out[rel] = {n: {k: v for k, v in e.items() if k != "added"} for n, e in manifest["experts"].items()}
      elif rel == "history.jsonl":
        out[rel] = [{k: v for k, v in json.loads(line).items() if k not in ("time", "removal")}
                    for line in open(path)]
      else:
        out[rel] = open(path, "rb").read()
    out.update({os.path.relpath(os.path.join(base, d), lib) + "/": "dir" for d in dirs})
  return out


@pytest.mark.parametrize("finish", ["verify --repair", "remove again", "add again"])
def test_an_interrupted_remove_is_finished(finish, made, tmp_path, capsys):
  """The state of a remove killed after its move to the trash, finished by `verify --repair`,
  by the same `remove` again, or (`add again`) by adding the same expert back: the first two
  give the library an uninterrupted remove gives; the third gives the original library."""
  from elm_jax.commands import cli
  reference = World(str(tmp_path / "ref"), str(made))
  assert cli.main(["library", "remove", lib_arg(reference), A]) == 0
  w = World(str(tmp_path / "world"), str(made))
  _pending_removal(w)
  capsys.readouterr()
  if finish == "verify --repair":
    assert cli.main(["library", "verify", "--repair", lib_arg(w)]) == 0
    assert "finished the interrupted removal of 'builtin_sentiment_is_positive'" in capsys.readouterr().out
  elif finish == "remove again":
    assert cli.main(["library", "remove", lib_arg(w), A]) == 0
  else:  # with the keys it had (--keys=auto draws them from whatever tasks this process registered)
    keys = shutil.copyfile(os.path.join(str(made), "lib", KEYS_FILE), w.path("keys.jsonl"))
    assert cli.main(["library", "add", lib_arg(w), f"--keys={keys}", os.path.join(str(made), "run", "experts", A)]) == 0
    assert f"added {A}" in capsys.readouterr().out
  assert cli.main(["library", "verify", lib_arg(w)]) == 0
  got = _library_state(w.library())
  if finish == "add again":
    original = _library_state(os.path.join(str(made), "lib"))
    assert {k: v for k, v in got.items() if k not in ("history.jsonl", ".lock")} == \
           {k: v for k, v in original.items() if k not in ("history.jsonl", ".lock")}
    assert [h["action"] for h in got["history.jsonl"]] == ["add", "add", "remove", "add"]
  else:
    assert got == _library_state(reference.library())
