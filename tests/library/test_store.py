"""ExpertLibrary: manifest, hashes, verify, append-only history, concurrent writers, continual adds,
removes and adds interrupted by a kill or failing on a full disk at any write."""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elm_jax import files
from elm_jax.checkpoints import expert_files
from elm_jax.errors import UserInputError
from elm_jax.library.store import ExpertLibrary, LibraryError
from tests.helpers.library import FINGERPRINT, make_expert, snapshot



def test_add_records_hashes_keys_and_history(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  src = make_expert(tmp_path / "src", "e1", 0)
  keys = [{"inputs": "a question", "answer_choices": ["yes", "no"]}]
  lib.add(src, keys=keys)
  entry = lib.entry("e1")
  tensors = tmp_path / "lib" / "experts" / "e1" / "tensors.safetensors"
  assert entry["files"]["tensors.safetensors"]["sha256"] == hashlib.sha256(tensors.read_bytes()).hexdigest()
  assert lib.keys("e1") == keys
  params, meta = lib.load("e1", FINGERPRINT)
  original, _ = expert_files.load_expert(src)
  np.testing.assert_array_equal(params["encoder"]["layers_0"]["mlp_adapter"]["up_kernel"],
                                original["encoder"]["layers_0"]["mlp_adapter"]["up_kernel"])
  assert [h["action"] for h in lib.history()] == ["add"]
  assert lib.verify() == []


def test_duplicates_and_foreign_backbones_are_refused(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  before = snapshot(tmp_path / "lib")
  with pytest.raises(LibraryError, match="already in the library"):
    lib.add(make_expert(tmp_path / "src2", "e1", 1))
  with pytest.raises(LibraryError, match="trained on backbone"):
    lib.add(make_expert(tmp_path / "src3", "e2", 2, fingerprint="0" * 32))
  assert snapshot(tmp_path / "lib") == before  # nothing written by the refused adds
  assert lib.names() == ["e1"]


def test_verify_catches_a_flipped_byte_and_a_truncation(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  lib.add(make_expert(tmp_path / "src", "e2", 1))
  tensors = tmp_path / "lib" / "experts" / "e1" / "tensors.safetensors"
  data = bytearray(tensors.read_bytes())
  data[-3] ^= 0x01
  tensors.write_bytes(bytes(data))
  problems = lib.verify()
  assert len(problems) == 1 and "e1/tensors.safetensors" in problems[0] and "changed" in problems[0]
  other = tmp_path / "lib" / "experts" / "e2" / "expert.json"
  other.write_bytes(other.read_bytes()[:-10])
  problems = lib.verify()
  assert len(problems) == 2 and "truncated" in problems[1]


def test_remove_keeps_history_and_other_experts(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0), keys=[{"inputs": "x"}])
  lib.add(make_expert(tmp_path / "src", "e2", 1))
  lib.remove("e1")
  assert lib.names() == ["e2"] and not lib.keys_path("e1").exists()
  assert not (tmp_path / "lib" / "experts" / "e1").exists()
  assert [h["action"] for h in lib.history()] == ["add", "add", "remove"]
  with pytest.raises(LibraryError, match="no expert named 'e1'"):
    lib.entry("e1")


def test_adding_experts_leaves_existing_files_unchanged(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  for i in range(3):
    lib.add(make_expert(tmp_path / "src", f"old{i}", i), keys=[{"inputs": f"k{i}"}])
  before = {k: v for k, v in snapshot(tmp_path / "lib").items()
            if k not in ("manifest.json", "history.jsonl", ".lock")}
  history_before = (tmp_path / "lib" / "history.jsonl").read_text()
  for i in range(2):
    lib.add(make_expert(tmp_path / "src", f"new{i}", 10 + i), keys=[{"inputs": f"n{i}"}])
  after = snapshot(tmp_path / "lib")
  assert {k: after[k] for k in before} == before
  assert (tmp_path / "lib" / "history.jsonl").read_text().startswith(history_before)
  manifest = lib.manifest()
  assert sorted(manifest["experts"]) == ["new0", "new1", "old0", "old1", "old2"]


def test_malformed_manifest_is_named(tmp_path):
  with pytest.raises(LibraryError, match="manifest.json: not found"):
    ExpertLibrary(tmp_path / "nothing")
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  (tmp_path / "lib" / "manifest.json").write_text("{not json")
  with pytest.raises(LibraryError, match="manifest.json: not valid JSON"):
    lib.names()
  (tmp_path / "lib" / "manifest.json").write_text(json.dumps({"format_version": 1, "experts": []}))
  with pytest.raises(LibraryError, match="field 'experts'"):
    lib.names()


def test_two_concurrent_add_processes_both_land(tmp_path):
  sources = [make_expert(tmp_path / "src", f"p{i}_{j}", 10 * i + j) for i in range(2) for j in range(6)]
  ExpertLibrary(tmp_path / "lib", create=True)
  script = textwrap.dedent("""
      import sys
      from elm_jax.library.store import ExpertLibrary
      lib = ExpertLibrary(sys.argv[1])
      for path in sys.argv[2:]:
        lib.add(path, keys=[{"inputs": path}])
  """)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "lib"), *sources[6 * i:6 * i + 6]])
           for i in range(2)]
  assert [p.wait(timeout=120) for p in procs] == [0, 0]
  lib = ExpertLibrary(tmp_path / "lib")
  assert lib.names() == sorted(f"p{i}_{j}" for i in range(2) for j in range(6))
  assert len(lib.history()) == 12 and lib.verify() == []
  assert not [p for p in os.listdir(tmp_path / "lib" / "experts") if p.startswith(".")]  # no leftovers


def test_an_add_killed_before_its_manifest_write_is_adopted_by_the_rerun(tmp_path):
  """The state a kill leaves between the rename of the expert directory and the manifest write
  (made here by hand): the rerun adds the expert without copying it again, and verify passes."""
  src = make_expert(tmp_path / "src", "e1", 0)
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  os.makedirs(tmp_path / "lib" / "experts")
  import shutil
  shutil.copytree(src, tmp_path / "lib" / "experts" / "e1")
  assert any("no manifest entry names it" in p for p in lib.verify())
  lib.add(src)
  assert lib.names() == ["e1"] and lib.verify() == []
  # An orphan holding other files is not adopted, and not deleted.
  shutil.copytree(make_expert(tmp_path / "src", "e2", 2), tmp_path / "lib" / "experts" / "e3")
  before = snapshot(tmp_path / "lib")
  with pytest.raises(LibraryError, match="holds another expert's files, and no manifest entry names it"):
    lib.add(make_expert(tmp_path / "src", "e3", 3))
  assert snapshot(tmp_path / "lib") == before


def test_staged_leftovers_are_reported_and_cleared_once_their_process_is_gone(tmp_path):
  from elm_jax.library import paths
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True).stdout.strip()
  stale = tmp_path / "lib" / "experts" / f".e2.{paths.host()}.{dead}.{'b' * 32}.tmp"
  live = tmp_path / "lib" / "experts" / f".e3.{paths.host()}.{os.getpid()}.{'c' * 32}.tmp"
  for path in (stale, live):
    path.mkdir()
    (path / "tensors.safetensors").write_bytes(b"half")
  problems = lib.verify()
  assert len(problems) == 2 and all("interrupted or running `library add`" in p for p in problems)
  lib.clear_interrupted_adds()
  assert not stale.exists() and live.exists()  # a running add's staging is left alone


def test_loading_checks_every_file_against_the_manifest(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0), keys=[{"inputs": "k"}])
  tensors = tmp_path / "lib" / "experts" / "e1" / "tensors.safetensors"
  data = bytearray(tensors.read_bytes())
  data[-3] ^= 0x01  # a flipped bit in the tensor data: the file still parses
  tensors.write_bytes(bytes(data))
  with pytest.raises(LibraryError, match=r"tensors.safetensors: expert 'e1': sha256 .* does not match"):
    lib.load("e1")
  unchecked = ExpertLibrary(tmp_path / "lib", check_integrity=False)
  params, _ = unchecked.load("e1")  # loads, and warns
  assert params["encoder"]["layers_0"]["mlp_adapter"]["up_kernel"].shape == (4, 8)
  keys = lib.keys_path("e1")
  keys.write_text('{"inputs": "changed"}\n')
  with pytest.raises(LibraryError, match="retrieval keys of expert 'e1'"):
    lib.keys("e1")


@pytest.mark.parametrize("directory, message", [
    ("../victim", "is not of the form 'experts/NAME'"),
    ("experts/../../victim", "is not of the form 'experts/NAME'"),
    ("/etc", "is not of the form 'experts/NAME'"),
    ("experts/..", "leaves the directory"),
    ("experts/.", "does not name an expert directory"),  # used to name experts/ itself
    ("experts/", "does not name an expert directory"),
])
def test_manifest_paths_never_leave_the_library(tmp_path, directory, message):
  (tmp_path / "victim").mkdir()
  (tmp_path / "victim" / "precious").write_text("x")
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
  manifest["experts"]["e1"]["directory"] = directory
  (tmp_path / "lib" / "manifest.json").write_text(json.dumps(manifest))
  for action in (lambda: lib.remove("e1"), lambda: lib.load("e1")):
    with pytest.raises(LibraryError, match=re.escape(message) if "'" in message else message):
      action()
  assert (tmp_path / "victim" / "precious").read_text() == "x"
  assert (tmp_path / "lib" / "experts" / "e1").is_dir()


# ---------------------------------------------------------------------------- an interrupted remove
class _Killed(BaseException):
  """Raised in place of the n-th file operation of a remove: what a kill leaves."""


def _removal_library(root):
  """Two experts with keys, e1 with cached embeddings of two embedders."""
  lib = ExpertLibrary(root, create=True)
  lib.add(make_expert(os.path.join(os.path.dirname(root), "src"), "e1", 0), keys=[{"inputs": "k1"}])
  lib.add(make_expert(os.path.join(os.path.dirname(root), "src"), "e2", 1), keys=[{"inputs": "k2"}])
  for embedder, text_format in (("t5", "label_instance"), ("minilm", "instance")):
    for name in ("e1", "e2") if embedder == "t5" else ("e1",):
      path = lib.embeddings_path(name, embedder, text_format)
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(os.fspath(path), np.ones((1, 4), np.float32))
  return lib


def _state(root) -> dict:
  """A library without its times and removal ids: its files, its entries, its history."""
  manifest = json.loads((root / "manifest.json").read_text())
  return {"files": {k: v for k, v in snapshot(root).items() if k not in ("manifest.json", "history.jsonl")},
          "entries": {n: {k: v for k, v in e.items() if k != "added"} for n, e in manifest["experts"].items()},
          "history": [(h["action"], h["name"]) for h in ExpertLibrary(root).history()]}


def test_a_remove_killed_at_any_step_leaves_the_old_state_or_one_a_rerun_finishes(tmp_path, monkeypatch):
  """Every file operation of `remove` in turn fails as a kill would: the library is left as it
  was, or with a removal that `verify` reports (naming `verify --repair`); `remove` again,
  `repair()` or an `add` finishes it, to the library an uninterrupted remove gives."""
  base = tmp_path / "base"
  _removal_library(base)
  reference = tmp_path / "reference"
  shutil.copytree(base, reference)
  assert ExpertLibrary(reference).remove("e1")
  want = _state(reference)
  assert not (reference / ".trash").exists() and not [k for k in want["files"] if "e1" in k]
  operations = [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
                (shutil, "rmtree"), (files, "write_atomically"), (ExpertLibrary, "_append_history")]
  states = set()
  for step in range(1, 200):
    root = tmp_path / f"killed_{step}"
    shutil.copytree(base, root)
    calls = [0]

    def failing(original):
      def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
          raise _Killed()
        return original(*args, **kwargs)
      return call
    with monkeypatch.context() as m:
      for owner, attribute in operations:
        m.setattr(owner, attribute, failing(getattr(owner, attribute)))
      try:
        ExpertLibrary(root).remove("e1")
        break  # `step` is past the last operation: nothing was interrupted
      except _Killed:
        pass
    lib = ExpertLibrary(root)
    problems = lib.verify()
    if any("an interrupted `library remove` of 'e1'" in p for p in problems):
      states.add("pending")
      assert all("--repair" in p for p in problems), problems
      listed = "e1" in lib.names()  # the kill came before the manifest update
      with pytest.raises(LibraryError, match="an interrupted `library remove` of it is pending" if listed
                         else "no expert named 'e1'"):
        lib.load("e1")
      finish = ("remove", "repair", "add")[step % 3]
    elif "e1" in lib.names():
      states.add("old")
      assert all("left by an interrupted `library remove`" in p for p in problems), problems  # an empty trash
      assert {k: v for k, v in snapshot(root).items() if "e1" in k and ".trash" not in k} == \
             {k: v for k, v in snapshot(base).items() if "e1" in k}
      finish = "remove"
    else:
      states.add("removed")
      assert all("left by an interrupted `library remove`" in p for p in problems), problems
      finish = "repair"
    if finish == "remove":
      lib.remove("e1")
    elif finish == "repair":
      lib.repair()
    else:  # adding another expert finishes the removal first
      lib.add(make_expert(tmp_path / f"src_{step}", "e3", 3))
      lib.remove("e3")
    assert lib.verify() == [] and not (root / ".trash").exists(), step
    got = _state(root)
    if finish == "add":
      assert got["history"][-2:] == [("add", "e3"), ("remove", "e3")]
      got["history"] = got["history"][:-2]
    assert got == want, step
  assert step > 12 and states == {"old", "pending", "removed"}, (step, states)


def test_the_same_expert_added_again_after_an_interrupted_remove(tmp_path):
  """A remove killed after moving the expert's directory to the trash (its manifest entry
  still there): adding the same expert again finishes the removal and adds it anew."""
  src = make_expert(tmp_path / "src", "e1", 0)
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(src, keys=[{"inputs": "k"}])
  before = snapshot(tmp_path / "lib" / "experts")
  entry = lib.entry("e1")
  trash = tmp_path / "lib" / ".trash" / f"e1.{'0' * 32}"
  trash.mkdir(parents=True)
  (trash / "removal.json").write_text(json.dumps({"name": "e1", "id": "0" * 32, "entry": entry}))
  os.rename(tmp_path / "lib" / "experts" / "e1", trash / "expert")
  assert not lib.holds_identical("e1", src)
  lib.add(src, keys=[{"inputs": "k"}])
  assert lib.verify() == [] and snapshot(tmp_path / "lib" / "experts") == before
  assert [(h["action"], h["name"]) for h in lib.history()] == [("add", "e1"), ("remove", "e1"), ("add", "e1")]
  assert not (tmp_path / "lib" / ".trash").exists()


def test_removing_a_removed_expert_again_does_nothing(tmp_path):
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  assert lib.remove("e1") is True
  before = snapshot(tmp_path / "lib")
  assert lib.remove("e1") is False  # a rerun of a remove that had finished
  assert snapshot(tmp_path / "lib") == before
  with pytest.raises(LibraryError, match="no expert named 'e9'"):
    lib.remove("e9")


def test_a_removal_record_that_names_another_entry_is_refused(tmp_path):
  """A hand-made (or hostile) removal record of e1 that points at e2's directory: nothing of
  e2 is touched."""
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  lib.add(make_expert(tmp_path / "src", "e2", 1))
  entry = dict(lib.entry("e1"), directory="experts/e2")
  trash = tmp_path / "lib" / ".trash" / f"e1.{'0' * 32}"
  trash.mkdir(parents=True)
  (trash / "removal.json").write_text(json.dumps({"name": "e1", "id": "0" * 32, "entry": entry}))
  before = snapshot(tmp_path / "lib")
  with pytest.raises(LibraryError, match=r"records the removal of 'e1' from 'experts/e2', but the manifest lists it"):
    lib.repair()
  assert snapshot(tmp_path / "lib") == before


def test_a_library_reached_through_a_linked_root_works(tmp_path):
  """The root may be a link (a library mounted elsewhere); only links below it are refused."""
  lib = ExpertLibrary(tmp_path / "real", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0), keys=[{"inputs": "k"}])
  os.symlink(tmp_path / "real", tmp_path / "linked")
  linked = ExpertLibrary(tmp_path / "linked")
  linked.add(make_expert(tmp_path / "src", "e2", 1), keys=[{"inputs": "k2"}])
  assert linked.keys("e1") == [{"inputs": "k"}] and linked.load("e2")[1].name == "e2"
  assert linked.remove("e1") and linked.verify() == [] and linked.names() == ["e2"]
  os.symlink(tmp_path / "real" / "experts" / "e2", tmp_path / "real" / "experts" / "e3")
  problems = linked.verify()
  assert len(problems) == 1 and "experts/e3: is a symbolic link to" in problems[0] and "inside the library" in problems[0]


# ---------------------------------------------------------------------------- a full disk at any write
# The operations by which the library writes; `_full_at` makes the n-th call of any of them on
# a path under `root` fail with ENOSPC, as a full disk does (write_atomically raising what it
# raises then).
_WRITES = [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "write"), (shutil, "copyfile"),
           (files, "write_atomically")]


def _full_at(monkeypatch, step: int, root) -> None:
  calls = [0]

  def failing(owner, name, original):
    def call(*args, **kwargs):
      target = args[1] if name in ("rename", "replace", "copyfile") else args[0]
      path = os.readlink(f"/proc/self/fd/{target}") if name == "write" else os.path.abspath(os.fspath(target))
      if os.path.commonpath([os.fspath(root), path]) == os.fspath(root):
        calls[0] += 1
        if calls[0] == step:
          error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if name == "write" else path)
          if owner is files:
            raise files.write_failure(target, error, len(args[1]), "the old file is kept")
          raise error
      return original(*args, **kwargs)
    return call
  for owner, name in _WRITES:
    monkeypatch.setattr(owner, name, failing(owner, name, getattr(owner, name)))


def _tree(root) -> dict:
  """Every file (its bytes) and directory below `root`: what a failed command must not change."""
  out = {}
  for base, dirs, names in os.walk(root):
    for name in names:
      out[os.path.relpath(os.path.join(base, name), root)] = open(os.path.join(base, name), "rb").read()
    out.update({os.path.relpath(os.path.join(base, d), root) + "/": "dir" for d in dirs})
  return out


def _fail_at_every_write(tmp_path, monkeypatch, base, run, said: str) -> int:
  """Runs `run(copy of base)` with its 1st, 2nd, ... write failing (a full disk) until it
  succeeds; each failure must be one line naming the full disk and `said`, and leave the copy
  as it was (every file's bytes, every directory; a library that was not there, not there).
  Returns the number of writes the successful run made."""
  for step in range(1, 100):
    root = tmp_path / f"full_{step}"
    if os.path.exists(base):
      shutil.copytree(base, root)
    before = _tree(root) if os.path.exists(root) else None
    with monkeypatch.context() as m:
      _full_at(m, step, root)
      try:
        run(root)
        return step - 1
      except UserInputError as e:
        message = str(e)
    assert "\n" not in message and "no space left on device" in message and said in message, (step, message)
    assert (_tree(root) if os.path.exists(root) else None) == before, (step, message)
  raise AssertionError("never succeeded")


def test_a_remove_failing_at_any_write_leaves_the_library_as_it_was(tmp_path, monkeypatch):
  """A full disk at each write of `remove` (the trash directories, the record, the renames,
  the history line, the manifest): one line, and the library byte for byte as it was (used
  to leave the empty `.trash/<name>.<id>/`); then the same remove, with space, removes it."""
  base = tmp_path / "base"
  _removal_library(base)
  writes = _fail_at_every_write(tmp_path, monkeypatch, base, lambda root: ExpertLibrary(root).remove("e1"),
                                "expert 'e1' was not removed; the library")
  assert writes >= 12  # 2 trash directories, the record, 4 renames, 4 embedding directories, history, manifest
  lib = ExpertLibrary(tmp_path / f"full_{writes + 1}")
  assert lib.names() == ["e2"] and lib.verify() == []


def test_an_add_failing_at_any_write_leaves_the_library_as_it_was(tmp_path, monkeypatch):
  """A full disk at each write of `add` (the staged directory, the copies, the keys, the
  rename, the history line, the manifest): one line naming the expert and the library, and
  nothing of the expert left."""
  base = tmp_path / "base"
  ExpertLibrary(base, create=True).add(make_expert(tmp_path / "src", "e1", 0), keys=[{"inputs": "k1"}])
  source = make_expert(tmp_path / "src", "e2", 1)
  writes = _fail_at_every_write(tmp_path, monkeypatch, base,
                                lambda root: ExpertLibrary(root).add(source, keys=[{"inputs": "k2"}]),
                                "expert 'e2' was not added to the library")
  assert writes >= 8
  lib = ExpertLibrary(tmp_path / f"full_{writes + 1}")
  assert lib.names() == ["e1", "e2"] and lib.keys("e2") == [{"inputs": "k2"}] and lib.verify() == []
  assert [h["action"] for h in lib.history()] == ["add", "add"]


def test_library_add_to_a_new_library_failing_at_any_write_leaves_nothing(tmp_path, monkeypatch):
  """`elm-jax library add --library=NEW` on a full disk: neither the library (its directories,
  lock and manifest) nor anything of the expert is left, whichever write fails."""
  from elm_jax.commands import cli
  source = make_expert(tmp_path / "src", "e1", 0)

  def run(root):
    if cli.main(["library", "add", f"--library={root / 'new' / 'lib'}", "--keys=none", source]):
      raise UserInputError("no space left on device (see the error line): expert 'e1' was not added")
  writes = _fail_at_every_write(tmp_path, monkeypatch, tmp_path / "none", run, "was not added")
  assert writes >= 7
  assert ExpertLibrary(tmp_path / f"full_{writes + 1}" / "new" / "lib").names() == ["e1"]


def test_a_history_line_cut_short_by_a_full_disk_is_not_left(tmp_path, monkeypatch):
  """`os.write` of the history line writing part of it, then failing: no part of the line is
  left (the next line would run on from it), and the error names history.jsonl and the bytes."""
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  history = (tmp_path / "lib" / "history.jsonl").read_bytes()
  real_write, calls = os.write, []

  def short_write(fd, data):
    calls.append(len(data))
    if len(calls) == 1:
      return real_write(fd, bytes(data[:10]))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, "write", short_write)
  with pytest.raises(files.FileCheckError, match=r"history.jsonl: no space left on device writing \d+ bytes$"):
    lib._append_history({"action": "add", "name": "x"})
  assert len(calls) == 2 and (tmp_path / "lib" / "history.jsonl").read_bytes() == history


def test_an_add_killed_after_its_history_line_is_recorded_once(tmp_path, monkeypatch):
  """An add killed between its history line and its manifest write: `verify` reports the
  expert's directory, and the rerun adopts it without a second history line."""
  src = make_expert(tmp_path / "src", "e1", 0)
  lib = ExpertLibrary(tmp_path / "lib", create=True)

  def killed(self, manifest):
    raise _Killed()
  with monkeypatch.context() as m:
    m.setattr(ExpertLibrary, "_write_manifest", killed)
    with pytest.raises(_Killed):
      lib.add(src, keys=[{"inputs": "k"}])
  assert any("no manifest entry names it" in p for p in lib.verify())
  lib.add(src, keys=[{"inputs": "k"}])
  assert lib.names() == ["e1"] and lib.verify() == []
  assert [(h["action"], h["name"]) for h in lib.history()] == [("add", "e1")]


def test_a_remove_that_cannot_be_put_back_is_left_pending(tmp_path, monkeypatch):
  """The manifest write fails (a full disk) and renaming the files back fails too: the one
  line says the removal is pending and how to finish it; `verify` reports it and `repair`
  finishes it."""
  lib = _removal_library(tmp_path / "lib")
  real_rename = os.rename

  def rename(source, target):
    if f"{os.sep}.trash{os.sep}" in os.fspath(source):
      raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(source))
    return real_rename(source, target)

  def full(self, manifest):
    raise files.write_failure(self.root / "manifest.json", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 10)
  with monkeypatch.context() as m:
    m.setattr(os, "rename", rename)
    m.setattr(ExpertLibrary, "_write_manifest", full)
    with pytest.raises(LibraryError, match=r"manifest.json: no space left on device writing 10 bytes; the removal "
                       r"of 'e1' is left pending in .*\.trash/e1\.[0-9a-f]{32}: `elm-jax library verify --repair "
                       r"--library=.*` finishes it \(putting it back failed: .*: Input/output error\)$"):
      lib.remove("e1")
  assert any("an interrupted `library remove` of 'e1'" in p for p in lib.verify())
  assert [line.startswith("finished the interrupted removal of 'e1'") for line in lib.repair()] == [True]
  assert lib.names() == ["e2"] and lib.verify() == []
  assert [(h["action"], h["name"]) for h in lib.history()] == [("add", "e1"), ("add", "e2"), ("remove", "e1")]
