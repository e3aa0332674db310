"""T5X checkpoints: the legacy msgpack + TensorStore layout (written here as t5x writes it),
Orbax PyTree checkpoints, format detection and dispatch."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from elm_jax.checkpoints import t5x
from elm_jax.checkpoints.hf import CheckpointError, save_hf_checkpoint
from tests.helpers.checkpoints import GATED, TIED, random_params, write_legacy_t5x
from tests.helpers.trees import assert_trees_equal

@pytest.mark.parametrize("config", [GATED, TIED], ids=["gated_untied", "relu_tied"])
def test_legacy_round_trip(tmp_path, config):
  params = random_params(config)
  ckpt = tmp_path / "checkpoint_1100"
  write_legacy_t5x(str(ckpt), params)
  array_dir = ckpt / "target.encoder.layers_0.attention.query.kernel"
  zarray = json.loads((array_dir / ".zarray").read_text())
  assert zarray["compressor"]["id"] == "gzip"
  assert (ckpt / "state.param_states.token_embedder.embedding.v_row").is_dir()
  assert t5x.detect_checkpoint_format(str(ckpt)) == "t5x_legacy"
  assert_trees_equal(t5x.load_t5x_checkpoint(str(ckpt), config), params)


def test_legacy_variants(tmp_path):
  """GCS-written specs, every array in TensorStore, bfloat16 zarr arrays, version-0 layout."""
  params = random_params(GATED, seed=1)
  write_legacy_t5x(str(tmp_path / "gcs"), params, kvstore="gcs", inline_1d=False)
  assert_trees_equal(t5x.load_t5x_checkpoint(str(tmp_path / "gcs"), GATED), params)
  write_legacy_t5x(str(tmp_path / "bf16"), params, dtype=ml_dtypes.bfloat16)
  loaded = t5x.load_t5x_checkpoint(str(tmp_path / "bf16"), GATED)
  expected = params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"]
  np.testing.assert_array_equal(loaded["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
                                expected.astype(ml_dtypes.bfloat16).astype(np.float32))
  write_legacy_t5x(str(tmp_path / "v0"), params, version=0)
  as_bf16 = t5x.load_t5x_checkpoint(str(tmp_path / "v0"), GATED, param_dtype=ml_dtypes.bfloat16)
  assert as_bf16["decoder"]["logits_dense"]["kernel"].dtype == ml_dtypes.bfloat16


def test_parent_directory_picks_latest_step(tmp_path, caplog):
  old, new = random_params(GATED, seed=2), random_params(GATED, seed=3)
  write_legacy_t5x(str(tmp_path / "checkpoint_900"), old)
  write_legacy_t5x(str(tmp_path / "checkpoint_1100"), new)
  os.makedirs(tmp_path / "checkpoint_2000.tmp-1234")  # an unfinished save is skipped
  with caplog.at_level("INFO", logger="elm_jax.checkpoints.t5x"):
    loaded = t5x.load_checkpoint(str(tmp_path), GATED)
  assert loaded.path == str(tmp_path / "checkpoint_1100") and loaded.format == "t5x_legacy"
  assert "checkpoint_1100" in caplog.text
  assert_trees_equal(loaded.params, new)
  by_file = t5x.load_t5x_checkpoint(str(tmp_path / "checkpoint_900" / "checkpoint"), GATED)
  assert_trees_equal(by_file, old)


def test_legacy_shape_mismatch_names_directory_and_parameter(tmp_path):
  ckpt = tmp_path / "checkpoint_1"
  write_legacy_t5x(str(ckpt), random_params(GATED))
  with pytest.raises(CheckpointError) as error:
    t5x.load_t5x_checkpoint(str(ckpt), GATED.replace(mlp_dim=48))
  message = str(error.value)
  assert str(ckpt) in message and "encoder/layers_0/mlp/wi_0/kernel" in message
  assert "expected shape (16, 48)" in message and "found (16, 32)" in message


def test_legacy_tied_config_against_untied_checkpoint(tmp_path):
  ckpt = tmp_path / "checkpoint_1"
  write_legacy_t5x(str(ckpt), random_params(GATED))
  with pytest.raises(CheckpointError, match="unexpected parameter decoder/logits_dense/kernel"):
    t5x.load_t5x_checkpoint(str(ckpt), GATED.replace(logits_via_embedding=True))


def test_legacy_missing_array(tmp_path):
  ckpt = tmp_path / "checkpoint_1"
  params = random_params(GATED)
  del params["decoder"]["layers_1"]["self_attention"]["value"]
  write_legacy_t5x(str(ckpt), params)
  with pytest.raises(CheckpointError, match="missing parameter "
                     "decoder/layers_1/self_attention/value/kernel"):
    t5x.load_t5x_checkpoint(str(ckpt), GATED)
  write_legacy_t5x(str(tmp_path / "checkpoint_3"), random_params(GATED), inline_1d=False)
  gone = tmp_path / "checkpoint_3" / "target.decoder.decoder_norm.scale"
  for name in os.listdir(gone):
    os.remove(gone / name)
  os.rmdir(gone)
  with pytest.raises(CheckpointError, match="target.decoder.decoder_norm.scale"):
    t5x.load_t5x_checkpoint(str(tmp_path / "checkpoint_3"), GATED)


def test_not_msgpack(tmp_path):
  ckpt = tmp_path / "checkpoint_5"
  ckpt.mkdir()
  (ckpt / "checkpoint").write_bytes(b"model_checkpoint_path: \"model.ckpt-5\"\n")
  with pytest.raises(CheckpointError, match="TensorFlow checkpoint"):
    t5x.load_t5x_checkpoint(str(ckpt), GATED)
  (ckpt / "checkpoint").write_bytes(b"\xc1\xc1\xc1")
  with pytest.raises(CheckpointError, match="not a T5X msgpack checkpoint"):
    t5x.load_t5x_checkpoint(str(ckpt), GATED)


def test_orbax_layouts(tmp_path):
  import orbax.checkpoint as ocp
  params = random_params(GATED, seed=5)
  state = {"target": params, "state": {"step": np.int32(7),
                                       "param_states": {"v": np.ones((3, 4), np.float32)}}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "t5x_state"), state)
  checkpointer.save(str(tmp_path / "bare"), params)
  checkpointer.save(str(tmp_path / "flax"), {"params": params, "step": np.int32(3)})
  checkpointer.wait_until_finished()
  with ocp.CheckpointManager(str(tmp_path / "manager")) as manager:
    manager.save(10, args=ocp.args.StandardSave(state))
    manager.save(20, args=ocp.args.StandardSave({"target": random_params(GATED, seed=6)}))
    manager.wait_until_finished()
  for name in ("t5x_state", "bare", "flax"):
    assert t5x.detect_checkpoint_format(str(tmp_path / name)) == "orbax"
    assert_trees_equal(t5x.load_t5x_checkpoint(str(tmp_path / name), GATED), params)
  assert_trees_equal(t5x.load_checkpoint(str(tmp_path / "manager" / "10"), GATED).params, params)
  latest = t5x.load_checkpoint(str(tmp_path / "manager"), GATED)
  assert latest.path == str(tmp_path / "manager" / "20") and latest.format == "orbax"
  assert_trees_equal(latest.params, random_params(GATED, seed=6))
  with pytest.raises(CheckpointError) as error:
    t5x.load_t5x_checkpoint(str(tmp_path / "bare"), GATED.replace(num_heads=4))
  assert ("encoder/relpos_bias/rel_embedding: expected shape (4, 32), found (2, 32)"
          in str(error.value))
  assert str(tmp_path / "bare") in str(error.value)


def test_dispatch_and_config_requirements(tmp_path):
  params = random_params(TIED)
  save_hf_checkpoint(params, TIED, str(tmp_path / "hf"))
  write_legacy_t5x(str(tmp_path / "legacy"), params)
  assert t5x.detect_checkpoint_format(str(tmp_path / "hf")) == "hf"
  loaded = t5x.load_checkpoint(str(tmp_path / "hf"))
  assert loaded.format == "hf" and loaded.config == TIED
  assert_trees_equal(loaded.params, params)
  with pytest.raises(CheckpointError, match="parameter shapes differ"):
    t5x.load_checkpoint(str(tmp_path / "hf"), GATED)
  with pytest.raises(CheckpointError, match="gin") as error:
    t5x.load_checkpoint(str(tmp_path / "legacy"))
  assert str(tmp_path / "legacy") in str(error.value)
  assert_trees_equal(t5x.load_checkpoint(str(tmp_path / "legacy"), TIED).params, params)
  with pytest.raises(CheckpointError, match="not found"):
    t5x.detect_checkpoint_format(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
    t5x.load_checkpoint(str(tmp_path / "empty"), TIED)
