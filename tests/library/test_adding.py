"""`library.adding.add_experts`, what `elm-jax library add` and `api.add_experts` run: the
experts a training run directory holds, added with a keys file, one line logged per expert;
the same add again skips them; bad arguments are refused before a library is made."""

import json
import os

import pytest

from elm_jax.library import adding
from elm_jax.library.store import ExpertLibrary, LibraryError
from tests.helpers.library import make_expert


@pytest.fixture
def run_dir(tmp_path):
  for seed, name in enumerate(["b_expert", "a_expert"]):
    make_expert(str(tmp_path / "run" / "experts"), name, seed)
  keys = tmp_path / "keys.jsonl"
  keys.write_text(json.dumps({"inputs": "a query"}) + "\n" + json.dumps({"inputs": "another"}) + "\n")
  return tmp_path


def test_adds_a_run_directorys_experts_and_logs_a_line_each(run_dir):
  lines = []
  lib = str(run_dir / "lib")
  names = adding.add_experts(lib, [str(run_dir / "run")], keys=str(run_dir / "keys.jsonl"), log=lines.append)
  assert names == ["a_expert", "b_expert"]
  assert lines == ["added a_expert (task_a; 2 retrieval keys)", "added b_expert (task_a; 2 retrieval keys)"]
  assert ExpertLibrary(lib).names() == names and len(ExpertLibrary(lib).keys("a_expert")) == 2
  lines.clear()
  adding.add_experts(lib, [str(run_dir / "run" / "experts" / "a_expert")], keys="none", log=lines.append)
  assert lines == ["already in the library: a_expert (same files; skipped)"]


def test_refuses_bad_arguments_before_making_the_library(run_dir):
  lib = run_dir / "lib"
  with pytest.raises(LibraryError, match="--name: names one expert, but 2 were given"):
    adding.add_experts(str(lib), [str(run_dir / "run")], keys="none", name="x")
  (run_dir / "bad.jsonl").write_text(json.dumps({"no_inputs": 1}) + "\n")
  with pytest.raises(LibraryError):
    adding.add_experts(str(lib), [str(run_dir / "run")], keys=str(run_dir / "bad.jsonl"))
  with pytest.raises(LibraryError, match="neither an expert directory"):
    adding.add_experts(str(lib), [str(run_dir)], keys="none")
  assert not os.path.exists(lib)
