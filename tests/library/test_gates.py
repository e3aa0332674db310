"""PHATGOOSE gates in a library (`library/gates.py`, `elm-jax train-gates`) and routed by them
(`route(..., method="phatgoose")`): gates stored beside each expert without touching its files,
recorded and verified, skipped once there, refused when missing, and a forced gate setup (every
gate 0: all experts tie, top-1 keeps the first) scoring as the first expert forced."""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from elm_jax import api
from elm_jax.commands import cli
from elm_jax.library import gates as library_gates
from elm_jax.library import routing_methods
from elm_jax.library.paths import LibraryError
from elm_jax.library.store import ExpertLibrary
from tests.helpers.library import fake_loaded, snapshot
from tests.hostile.harness import TASKS, train_args

TASK = "builtin_nli_can_we_infer_score_eval"
SCORING = dict(max_examples=8, max_input_length=32, max_target_length=8, batch_size=4)
GATE_FLAGS = ["--steps=3", "--batch_size=2", "--input_length=32", "--target_length=8"]


def _cli(*argv) -> int:
  code = cli.main([str(a) for a in argv])
  gin.clear_config()
  return code


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
  root = tmp_path_factory.mktemp("gates")
  assert _cli(*train_args(root / "run")) == 0
  assert _cli("library", "add", f"--library={root / 'lib'}", root / "run") == 0
  return root / "lib"


def test_gates_are_trained_stored_verified_and_routed(lib, tmp_path, capsys):
  before = snapshot(lib / "experts")
  assert _cli("train-gates", f"--library={lib}", f"--model_dir={tmp_path / 'g1'}", f"--experts={TASKS[0]}",
              *GATE_FLAGS) == 0
  assert f"{TASKS[0]}\tgates trained\tloss" in capsys.readouterr().out
  with pytest.raises(routing_methods.RoutingMethodError,
                     match=f"method 'phatgoose': expert\\(s\\) without gates: {TASKS[1]}; train them"):
    api.route(lib, TASK, method="phatgoose", **SCORING)
  assert _cli("train-gates", f"--library={lib}", f"--model_dir={tmp_path / 'g2'}", *GATE_FLAGS,
              "--mesh=data:2,expert:1,model:4") == 0  # the run split over the 8 devices
  out = capsys.readouterr().out
  assert f"{TASKS[1]}\tgates trained" in out and f"{TASKS[0]}\tgates already recorded: skipped" in out
  after = snapshot(lib / "experts")
  assert {k: v for k, v in after.items() if not k.endswith("gates.safetensors")} == before  # expert files untouched
  library = ExpertLibrary(lib)
  for name in TASKS:
    entry = library.entry(name)
    assert entry["gates_file"]["bytes"] == os.path.getsize(lib / entry["directory"] / "gates.safetensors")
    gates = library_gates.load_gates(library, name)
    assert gates and all(v.ndim == 1 for v in gates.values())
  assert library.verify() == []
  routed = api.route(lib, TASK, method="phatgoose", top_k=1, **SCORING)
  uniform = api.route(lib, TASK, method="uniform", **SCORING)
  assert routed.scores.shape == uniform.scores.shape and np.isfinite(routed.accuracy)
  assert np.abs(routed.scores - uniform.scores)[np.isfinite(uniform.scores)].max() > 1e-5


def test_verify_detects_a_damaged_gates_file_and_loading_refuses_it(lib, tmp_path):
  copy = tmp_path / "lib"
  shutil.copytree(lib, copy)
  library = ExpertLibrary(copy)
  if not library.entry(TASKS[0]).get("gates_file"):
    pytest.skip("needs the gates the test above trains")
  path = copy / library.entry(TASKS[0])["directory"] / "gates.safetensors"
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  problems = library.verify()
  assert len(problems) == 1 and problems[0].startswith(f"{path}: sha256") and "(changed)" in problems[0]
  with pytest.raises(LibraryError, match="gates of expert"):
    library_gates.load_gates(library, TASKS[0])
  manifest = json.loads((copy / "manifest.json").read_text())
  assert set(manifest["experts"][TASKS[0]]["files"]) == {"tensors.safetensors", "expert.json"}
  assert library.remove(TASKS[0]) and not path.exists()  # removed with its expert


# ------------------------------------------------------------------ a forced gate setup
NAMES = ["astronomy", "cooking", "law"]
ROWS = [{"inputs": "A distant galaxy seen by a telescope", "answer_choices": ["yes", "no"], "label": 0},
        {"inputs": "The court read the contract", "answer_choices": ["yes", "no", "maybe"], "label": 2},
        {"inputs": "Bake the onions in the oven", "answer_choices": ["true", "false"], "label": 1}]
FAKE_SCORING = dict(batch_size=4, max_input_length=32, max_target_length=8)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  """Three adapter experts that differ (no layer norms of their own: a per-token method mixes
  those uniformly), over a library holding an entry of each name."""
  return fake_loaded(tmp_path_factory.mktemp("phatgoose"), NAMES, train_layer_norms=False)


def test_gates_that_tie_everywhere_route_every_token_to_the_first_expert(fake):
  gates = {key: np.zeros(32, np.float32) for key in ("encoder/layers_0/attention", "encoder/layers_0/mlp",
                                                      "decoder/layers_0/self_attention", "decoder/layers_0/mlp")}
  library_gates._record(fake.library, {name: (gates, {}) for name in NAMES})
  routed = routing_methods.route(fake, ROWS, "phatgoose", top_k=1, **FAKE_SCORING)
  forced = routing_methods.route(fake, ROWS, "forced", expert=NAMES[0], **FAKE_SCORING)
  other = routing_methods.route(fake, ROWS, "forced", expert=NAMES[1], **FAKE_SCORING)
  finite = np.isfinite(forced.scores)
  np.testing.assert_allclose(routed.scores[finite], forced.scores[finite], rtol=2e-6, atol=5e-5)
  assert np.abs(other.scores[finite] - forced.scores[finite]).max() > 1e-3  # the experts differ
  # A gate with a direction makes routing depend on the token: no longer expert 0 everywhere.
  rng = np.random.default_rng(0)
  varied = {k: rng.normal(size=32).astype(np.float32) for k in gates}
  library_gates._record(fake.library, {NAMES[1]: (varied, {})})
  routed = routing_methods.route(fake, ROWS, "phatgoose", top_k=1, **FAKE_SCORING)
  assert np.abs(routed.scores[finite] - forced.scores[finite]).max() > 1e-4


def test_train_gates_refusals_are_one_line(lib, tmp_path, capsys):
  assert _cli("train-gates", f"--library={lib}", f"--model_dir={tmp_path}", "--tasks=no_equals_sign") == 2
  assert capsys.readouterr().err.strip() == (
      "elm-jax train-gates: error: --tasks: expected NAME=TASK,..., got 'no_equals_sign'")
