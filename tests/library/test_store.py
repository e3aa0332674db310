"""ExpertLibrary: manifest, hashes, verify, append-only history, concurrent writers, continual adds."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elm_jax.checkpoints import expert_files
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
  from elm_jax.library import store
  lib = ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(make_expert(tmp_path / "src", "e1", 0))
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True).stdout.strip()
  stale = tmp_path / "lib" / "experts" / f".e2.{store._host()}.{dead}.{'b' * 32}.tmp"
  live = tmp_path / "lib" / "experts" / f".e3.{store._host()}.{os.getpid()}.{'c' * 32}.tmp"
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
