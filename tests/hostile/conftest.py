"""The prepared run and library every hostile-input module starts its cases from (built once
for the package)."""

from __future__ import annotations

import gin
import pytest

from elm_jax.commands import cli
from tests.hostile.harness import train_args


@pytest.fixture(scope="package")
def made(tmp_path_factory):
  """A training run of two experts and a library of them with retrieval keys."""
  root = tmp_path_factory.mktemp("made")
  run = root / "run"
  assert cli.main(train_args(run)) == 0
  gin.clear_config()
  lib = root / "lib"
  assert cli.main(["library", "add", f"--library={lib}", str(run)]) == 0
  gin.clear_config()
  return root
