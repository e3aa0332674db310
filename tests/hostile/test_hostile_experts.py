"""Hostile experts: tensors an expert of its kind may not hold, or values no expert may hold.

An expert's `tensors.safetensors` must hold exactly its kind's parameter list on the backbone
it was trained on (names, shapes, dtypes; `expert_files.parameter_list`) and only finite values.
Each case tampers with an expert in a fresh copy of the prepared library (rewriting the
manifest's sha256 and size of the file, so that only the parameter check can catch it) or in a
copy of a trained expert directory, and asserts that `library add`, every load (`score`,
`eval`, `retrieve --method=likelihood`, `merge`), `merge`'s output and `library verify` refuse
it in one line naming the tensor, with nothing already written changed (`harness.run_case`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.hostile.harness import TASKS, Case, World, lib_arg, run_case

TENSORS = "tensors.safetensors"
BACKBONE_WEIGHT = "decoder/layers_0/mlp/wo/kernel"
UP_KERNEL = "encoder/layers_0/mlp_adapter/up_kernel"    # [bottleneck 2, embed 64]
DOWN_BIAS = "decoder/layers_0/mlp_adapter/down_bias"    # [bottleneck 2]


def _edit(tensors: dict, change: Callable[[dict], None]) -> dict:
  tensors = dict(tensors)
  change(tensors)
  return tensors


def with_backbone_weight(t):
  t[BACKBONE_WEIGHT] = np.zeros((128, 64), np.float32)


def with_nan(t):
  t[UP_KERNEL] = t[UP_KERNEL].copy()
  t[UP_KERNEL].flat[[0, 5, 9]] = np.nan
  t[UP_KERNEL].flat[11] = np.inf


def with_inf(t):
  t[DOWN_BIAS] = t[DOWN_BIAS].copy()
  t[DOWN_BIAS][1] = -np.inf


def without_tensor(t):
  del t[UP_KERNEL]


def with_wrong_shape(t):
  t[UP_KERNEL] = np.zeros((64, 2), np.float32)


def with_wrong_dtype(t):
  t[UP_KERNEL] = t[UP_KERNEL].astype(np.float16)


def with_extra_key(t):
  t["notes/optimizer_step"] = np.zeros((1,), np.float32)


def tamper_in_library(w: World, change: Callable[[dict], None], expert: str = TASKS[0]) -> None:
  """Rewrites `expert`'s tensors in the world's library with `change` applied, and the
  manifest's sha256 and size of the file to match (so the hash check passes)."""
  path = os.path.join(w.library(), "experts", expert, TENSORS)
  save_file(_edit(load_file(path), change), path)
  data = open(path, "rb").read()
  w.manifest(lambda m: m["experts"][expert]["files"][TENSORS].update(
      sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))


def rewrite_record(w: World, change: Callable[[dict], None], expert: str = TASKS[0]) -> None:
  """Rewrites `expert`'s expert.json in the world's library with `change` applied to its JSON,
  and the manifest's sha256 and size of the file to match."""
  path = os.path.join(w.library(), "experts", expert, "expert.json")
  record = json.load(open(path))
  change(record)
  data = json.dumps(record, indent=1, sort_keys=True).encode()
  open(path, "wb").write(data)
  w.manifest(lambda m: m["experts"][expert]["files"]["expert.json"].update(
      sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))


def without_model_config(record):
  del record["training_config"]["model"]


def with_bad_model_config(record):
  record["training_config"]["model"]["emb_dim"] = "wide"


def tampered_copy(w: World, change: Callable[[dict], None]) -> str:
  """A copy of a trained expert directory (from the world's copy of the run) with `change`
  applied to its tensors."""
  copy = w.path("tampered")
  shutil.copytree(os.path.join(w.run_dir(), "experts", TASKS[0]), copy)
  path = os.path.join(copy, TENSORS)
  save_file(_edit(load_file(path), change), path)
  return copy


def verify(change):
  return lambda w: (tamper_in_library(w, change), ["library", "verify", lib_arg(w)])[1]


def score(change):
  return lambda w: (tamper_in_library(w, change),
                    ["score", lib_arg(w), f"--experts={TASKS[0]}", f"--input={w.examples()}",
                     f"--output={w.path('o.jsonl')}"])[1]


def eval_(change):
  return lambda w: (tamper_in_library(w, change),
                    ["eval", lib_arg(w), f"--experts={TASKS[0]}", "--task=builtin_nli_gpt3_style",
                     f"--output_dir={w.path('ev')}", "--max_examples=4"])[1]


def merge(change):
  return lambda w: (tamper_in_library(w, change),
                    ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", "--name=merged"])[1]


def add_fresh(change):
  return lambda w: ["library", "add", f"--library={w.path('newlib')}", "--keys=none", tampered_copy(w, change)]


def add_existing(change):
  return lambda w: ["library", "add", lib_arg(w), "--keys=none", "--name=tampered", tampered_copy(w, change)]


NOT_A_PARAMETER = (rf"{TASKS[0]}/{TENSORS}: tensor '{BACKBONE_WEIGHT}' is not a parameter of an? 'adapter' "
                   r"expert \(expected only its 23 parameters")
NAN = rf"{TENSORS}: tensor '{UP_KERNEL}' holds 3 NaN and 1 Inf values"
INF = rf"{TENSORS}: tensor '{DOWN_BIAS}' holds 1 Inf value"
MISSING = rf"{TASKS[0]}/{TENSORS}: tensor '{UP_KERNEL}' is missing"
SHAPE = rf"{TASKS[0]}/{TENSORS}: tensor '{UP_KERNEL}' has shape \(64, 2\), expected \(2, 64\)"
DTYPE = rf"{TASKS[0]}/{TENSORS}: tensor '{UP_KERNEL}' has dtype float16, expected float32"
EXTRA = rf"{TENSORS}: tensor 'notes/optimizer_step' is not a parameter of an? 'adapter' expert"

CASES = [
    # ------------------------------------------------------------------ a backbone weight in an adapter
    Case("library verify: an adapter expert that also holds a zeroed backbone weight",
         verify(with_backbone_weight), status=1, stdout=NOT_A_PARAMETER),
    Case("score: an adapter expert that also holds a zeroed backbone weight",
         score(with_backbone_weight), message=NOT_A_PARAMETER),
    Case("library add: an adapter expert that also holds a backbone weight, to a fresh library",
         add_fresh(with_backbone_weight),
         message=rf"tampered/{TENSORS}: tensor '{BACKBONE_WEIGHT}' is not a parameter of an? 'adapter' expert"),
    Case("library add: an adapter expert that also holds a backbone weight, to the library",
         add_existing(with_backbone_weight),
         message=rf"tampered/{TENSORS}: tensor '{BACKBONE_WEIGHT}' is not a parameter of an? 'adapter' expert"),
    # ------------------------------------------------------------------ NaN and Inf
    Case("library add: an expert holding NaN", add_fresh(with_nan), message=NAN),
    Case("library add: an expert holding Inf", add_existing(with_inf), message=INF),
    Case("eval: an expert holding NaN", eval_(with_nan), message=NAN),
    Case("eval: an expert holding Inf", eval_(with_inf), message=INF),
    Case("merge: an expert holding NaN", merge(with_nan), message=NAN),
    Case("merge: an expert holding Inf", merge(with_inf), message=INF),
    Case("library verify: an expert holding NaN", verify(with_nan), status=1, stdout=NAN),
    Case("library verify: an expert holding Inf", verify(with_inf), status=1, stdout=INF),
    Case("score: an expert holding NaN", score(with_nan), message=NAN),
    Case("score: an expert holding Inf", score(with_inf), message=INF),
    Case("retrieve --method=likelihood: an expert holding NaN",
         lambda w: (tamper_in_library(w, with_nan),
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--method=likelihood",
                     "--num_queries=2"])[1],
         message=NAN),
    Case("retrieve --method=oracle: a tensor of the wrong shape",
         lambda w: (tamper_in_library(w, with_wrong_shape),
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--method=oracle",
                     "--num_queries=2"])[1],
         message=SHAPE),
    Case("merge: a merged expert that overflows float32 (--scale=1e300) is not saved",
         lambda w: ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", "--method=task_arithmetic",
                    "--scale=1e300", "--name=merged"],
         message=r"--name=merged: the merged expert: tensor '.*' holds \d+ Inf values?"),
    # ------------------------------------------------------------------ missing, reshaped, retyped, extra
    Case("library verify: an expert missing a tensor", verify(without_tensor), status=1, stdout=MISSING),
    Case("score: an expert missing a tensor", score(without_tensor), message=MISSING),
    Case("library verify: a tensor of the wrong shape", verify(with_wrong_shape), status=1, stdout=SHAPE),
    Case("score: a tensor of the wrong shape", score(with_wrong_shape), message=SHAPE),
    Case("library verify: a tensor of the wrong dtype", verify(with_wrong_dtype), status=1, stdout=DTYPE),
    Case("eval: a tensor of the wrong dtype", eval_(with_wrong_dtype), message=DTYPE),
    Case("library verify: an extra non-parameter key", verify(with_extra_key), status=1, stdout=EXTRA),
    Case("score: an extra non-parameter key", score(with_extra_key), message=EXTRA),
    Case("library add: an extra non-parameter key", add_fresh(with_extra_key), message=EXTRA),
    # ------------------------------------------------------------------ expert.json without (or with a bad) backbone config
    Case("score: a wrong shape in an expert whose expert.json records no backbone config",
         lambda w: (rewrite_record(w, without_model_config), score(with_wrong_shape)(w))[1],
         message=rf"experts/{TASKS[0]}: tensor '{UP_KERNEL}' has shape \(64, 2\), expected \(2, 64\), for the "
                 r"backbone they run on \(.*backbone\)"),
    Case("library verify: a backbone weight in an expert whose expert.json records no backbone config",
         lambda w: (rewrite_record(w, without_model_config), verify(with_backbone_weight)(w))[1],
         status=1, stdout=rf"{TENSORS}: tensor '{BACKBONE_WEIGHT}' is not a parameter of an 'adapter' expert "
                          r"\(expected only the modules its kind adds"),
    Case("library verify: an expert.json whose backbone config cannot be built",
         lambda w: (rewrite_record(w, with_bad_model_config), ["library", "verify", lib_arg(w)])[1],
         status=1, stdout=r"expert.json: field 'training_config.model': T5Config.emb_dim: expected a positive "
                          r"integer, got 'wide'"),
    Case("score: an expert.json whose backbone config cannot be built",
         lambda w: (rewrite_record(w, with_bad_model_config), score(lambda t: None)(w))[1],
         message=r"expert.json: field 'training_config.model': T5Config.emb_dim: expected a positive integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_expert(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)


def test_verify_passes_the_prepared_library(made, capsys):
  """The check accepts what training writes: the prepared library verifies clean."""
  from elm_jax.commands import cli
  assert cli.main(["library", "verify", f"--library={made / 'lib'}"]) == 0, capsys.readouterr()


def test_manifest_rewrite_keeps_the_hash_check_quiet(made, tmp_path):
  """The tampering helper leaves a library whose hashes match (only the new checks can see)."""
  from elm_jax.library.store import ExpertLibrary
  w = World(str(tmp_path / "world"), str(made))
  os.makedirs(w.root)
  tamper_in_library(w, with_backbone_weight)
  entry = json.load(open(os.path.join(w.library(), "manifest.json")))["experts"][TASKS[0]]
  path = os.path.join(w.library(), "experts", TASKS[0], TENSORS)
  assert entry["files"][TENSORS]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert not [p for p in ExpertLibrary(w.library()).verify() if "sha256" in p or "bytes" in p]
