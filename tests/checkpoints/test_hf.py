"""Hugging Face safetensors checkpoints: name table, round trips, and the errors users meet."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from elm_jax.checkpoints.hf import (CheckpointError, hf_name_table, load_hf_checkpoint,
                                    save_hf_checkpoint)
from elm_jax.models.t5 import param_shapes

from tests.helpers.checkpoints import GATED, TIED, random_params
from tests.helpers.trees import assert_trees_equal

def rewrite_weights(directory, edit):
  """Loads model.safetensors, applies `edit(tensors)` and writes it back."""
  file = os.path.join(directory, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})
  return file


@pytest.mark.parametrize("config", [GATED, TIED], ids=["gated_untied", "relu_tied"])
def test_round_trip_exact(tmp_path, config):
  params = random_params(config)
  vocab = tmp_path / "spm.model"
  vocab.write_bytes(b"not really a sentencepiece model")
  out = tmp_path / "hf"
  save_hf_checkpoint(params, config, str(out), model_type="t5", vocab_path=str(vocab))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spiece.model"]
  loaded = load_hf_checkpoint(str(out))
  assert loaded.config == config
  assert loaded.model_type == "t5"
  assert loaded.vocab_path == str(out / "spiece.model")
  assert_trees_equal(loaded.params, params)
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    names = set(f.keys())
  assert ("lm_head.weight" in names) == (not config.logits_via_embedding)
  assert "shared.weight" in names and "encoder.embed_tokens.weight" not in names


def test_name_table_layouts():
  table = hf_name_table(GATED)
  assert len(table) == sum(1 for _ in _leaves(param_shapes(GATED)))
  q = table["encoder.block.1.layer.0.SelfAttention.q.weight"]
  assert q.path == ("encoder", "layers_1", "attention", "query", "kernel") and q.transpose
  cross = table["decoder.block.0.layer.1.EncDecAttention.o.weight"]
  assert cross.path == ("decoder", "layers_0", "encoder_decoder_attention", "out", "kernel")
  assert table["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"].path[-2] == "wi_1"
  assert table["decoder.block.1.layer.1.layer_norm.weight"].path[-2] == (
      "pre_cross_attention_layer_norm")
  rel = table["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
  assert rel.path == ("decoder", "relpos_bias", "rel_embedding")
  assert rel.hf_shape((2, 32)) == (32, 2)
  assert "lm_head.weight" not in hf_name_table(TIED)
  assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in hf_name_table(TIED)


def _leaves(tree):
  for value in tree.values():
    if isinstance(value, dict):
      yield from _leaves(value)
    else:
      yield value


def test_transposes_match_torch_layout(tmp_path):
  params = random_params(GATED)
  save_hf_checkpoint(params, GATED, str(tmp_path / "hf"))
  tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
  kernel = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]  # [emb, heads*kv]
  np.testing.assert_array_equal(tensors["encoder.block.0.layer.0.SelfAttention.q.weight"], kernel.T)
  np.testing.assert_array_equal(tensors["lm_head.weight"],
                                params["decoder"]["logits_dense"]["kernel"].T)
  np.testing.assert_array_equal(
      tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
      params["encoder"]["relpos_bias"]["rel_embedding"].T)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["d_model"] == 16 and config["tie_word_embeddings"] is False


def test_sharded_round_trip(tmp_path):
  params = random_params(GATED, seed=1)
  out = tmp_path / "sharded"
  save_hf_checkpoint(params, GATED, str(out), max_shard_bytes=8 * 1024)
  names = sorted(os.listdir(out))
  shards = [n for n in names if n.endswith(".safetensors")]
  assert "model.safetensors" not in names and "model.safetensors.index.json" in names
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(hf_name_table(GATED))
  assert set(index["weight_map"].values()) == set(shards)
  assert_trees_equal(load_hf_checkpoint(str(out)).params, params)


def test_bfloat16_tensors(tmp_path):
  params = random_params(GATED, seed=2)
  out = tmp_path / "bf16"
  save_hf_checkpoint(params, GATED, str(out), save_dtype=ml_dtypes.bfloat16)
  raw = (out / "model.safetensors").read_bytes()
  header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
  assert header["shared.weight"]["dtype"] == "BF16"
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  loaded = load_hf_checkpoint(str(out))
  expected = params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
  got = loaded.params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected.astype(ml_dtypes.bfloat16).astype(np.float32))
  as_bf16 = load_hf_checkpoint(str(out), param_dtype=ml_dtypes.bfloat16)
  assert as_bf16.params["token_embedder"]["embedding"].dtype == ml_dtypes.bfloat16


def test_embed_tokens_stand_in_for_shared(tmp_path):
  params = random_params(TIED, seed=3)
  out = tmp_path / "hf"
  save_hf_checkpoint(params, TIED, str(out))

  def move_shared(tensors):
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    tensors["lm_head.weight"] = np.zeros((64, 16), np.float32)  # ignored: tied

  rewrite_weights(out, move_shared)
  assert_trees_equal(load_hf_checkpoint(str(out)).params, params)


def test_missing_tensor(tmp_path):
  out = tmp_path / "hf"
  save_hf_checkpoint(random_params(GATED), GATED, str(out))
  rewrite_weights(out, lambda t: t.pop("decoder.block.1.layer.1.EncDecAttention.k.weight"))
  with pytest.raises(CheckpointError) as error:
    load_hf_checkpoint(str(out))
  message = str(error.value)
  assert str(out / "model.safetensors") in message
  assert "decoder.block.1.layer.1.EncDecAttention.k.weight" in message
  assert "decoder/layers_1/encoder_decoder_attention/key/kernel" in message
  assert "(16, 16)" in message


def test_wrong_shape(tmp_path):
  out = tmp_path / "hf"
  save_hf_checkpoint(random_params(GATED), GATED, str(out))
  name = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"

  def shrink(tensors):
    tensors[name] = tensors[name][:16]

  file = rewrite_weights(out, shrink)
  with pytest.raises(CheckpointError) as error:
    load_hf_checkpoint(str(out))
  message = str(error.value)
  assert file in message and name in message
  assert "encoder/layers_0/mlp/wi_0/kernel" in message
  assert "expected shape (32, 16)" in message and "found (16, 16)" in message


def test_unexpected_tensor(tmp_path):
  out = tmp_path / "hf"
  save_hf_checkpoint(random_params(GATED), GATED, str(out))
  name = "encoder.block.2.layer.0.SelfAttention.q.weight"
  file = rewrite_weights(out, lambda t: t.__setitem__(name, np.zeros((16, 16), np.float32)))
  with pytest.raises(CheckpointError, match="unexpected tensor") as error:
    load_hf_checkpoint(str(out))
  assert file in str(error.value) and name in str(error.value)


def test_pickle_checkpoint_refused(tmp_path):
  out = tmp_path / "torch_only"
  out.mkdir()
  (out / "config.json").write_text(json.dumps(GATED.to_hf_config()))
  (out / "pytorch_model.bin").write_bytes(b"\x80\x02not loaded")
  with pytest.raises(CheckpointError) as error:
    load_hf_checkpoint(str(out))
  message = str(error.value)
  assert "pytorch_model.bin" in message and "not loaded" in message
  assert "save_pretrained" in message and "safe_serialization=True" in message


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(CheckpointError, match="not found") as error:
    load_hf_checkpoint(str(tmp_path / "nowhere"))
  assert str(tmp_path / "nowhere") in str(error.value)
  out = tmp_path / "hf"
  save_hf_checkpoint(random_params(GATED), GATED, str(out))
  os.remove(out / "config.json")
  with pytest.raises(CheckpointError) as error:
    load_hf_checkpoint(str(out))
  assert str(out / "config.json") in str(error.value)


def test_save_refuses_to_clobber_and_replaces_atomically(tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(CheckpointError, match="overwrite=True"):
    save_hf_checkpoint(random_params(GATED), GATED, str(out))
  assert os.listdir(out) == ["keep.txt"]
  # overwrite=True replaces a checkpoint, never a directory holding anything else.
  with pytest.raises(CheckpointError, match=r"holds files that are not a Hugging Face checkpoint's \(keep.txt\)"):
    save_hf_checkpoint(random_params(GATED), GATED, str(out), overwrite=True)
  assert os.listdir(out) == ["keep.txt"]
  out = tmp_path / "hf2"
  save_hf_checkpoint(random_params(GATED, seed=3), GATED, str(out))
  params = random_params(GATED, seed=4)
  save_hf_checkpoint(params, GATED, str(out), overwrite=True)
  assert_trees_equal(load_hf_checkpoint(str(out)).params, params)
  assert sorted(os.listdir(tmp_path)) == ["hf", "hf2"]  # no temporary directories left behind


def test_save_checks_params(tmp_path):
  params = random_params(GATED)
  del params["decoder"]["logits_dense"]
  with pytest.raises(CheckpointError, match="decoder/logits_dense/kernel"):
    save_hf_checkpoint(params, GATED, str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()


def test_config_the_model_cannot_represent(tmp_path):
  from elm_jax.checkpoints import hf
  hf.save_hf_checkpoint(random_params(GATED), GATED, str(tmp_path / "c"))
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  config["feed_forward_proj"] = "gated-silu"
  (tmp_path / "c" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match="config.json: field 'feed_forward_proj' is 'gated-silu'"):
    hf.load_hf_checkpoint(str(tmp_path / "c"))


@pytest.mark.parametrize("proj, act, message", [
    ("gelu", None, "runs the exact GELU"),
    ("gated-gelu", "relu", "field 'dense_act_fn' is 'relu' but 'feed_forward_proj' 'gated-gelu' runs 'gelu_new'"),
])
def test_activations_the_model_cannot_represent(proj, act, message):
  from elm_jax.models.t5_config import ConfigError, T5Config
  config = GATED.to_hf_config()
  config["feed_forward_proj"] = proj
  config.pop("is_gated_act")
  config.pop("dense_act_fn")
  if act:
    config["dense_act_fn"] = act
  with pytest.raises(ConfigError, match=message):
    T5Config.from_hf_config(config)
