"""load_model_checkpoint: one entry from any checkpoint directory to a ready model."""

import gin
import pytest
from tests.helpers.checkpoints import GATED, random_params, write_legacy_t5x
from tests.helpers.trees import assert_trees_equal

from elm_jax.checkpoints import hf, loading


def test_load_model_checkpoint_dispatches(tmp_path):
  params = random_params(GATED)
  hf.save_hf_checkpoint(params, GATED, str(tmp_path / "hf"))
  loaded = loading.load_model_checkpoint(str(tmp_path / "hf"), dtype="bfloat16")
  assert loaded.config.dtype == "bfloat16" and loaded.vocab_path is None
  assert_trees_equal(loaded.params, params)
  write_legacy_t5x(str(tmp_path / "t5x"), params)
  assert_trees_equal(loading.load_model_checkpoint(str(tmp_path / "t5x"), config=GATED).params, params)
  gin.clear_config()
  with pytest.raises(hf.CheckpointError, match="no config.json; pass a model gin file"):
    loading.load_model_checkpoint(str(tmp_path / "t5x"))
  with pytest.raises(hf.CheckpointError, match="checkpoint directory not found"):
    loading.load_model_checkpoint(str(tmp_path / "nowhere"))
