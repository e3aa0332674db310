"""Checkpoint import/export: HF safetensors both ways, T5X legacy (msgpack + zarr) and Orbax in.

The T5X legacy files are written here the way t5x's Checkpointer writes them: a flax-msgpack
file `checkpoint` = {"version", "optimizer": {"target", "state"}} where partitioned arrays are
replaced by the JSON of a tensorstore zarr spec whose kvstore path ("target.encoder....") is
relative to the checkpoint directory, and the arrays live there gzip-compressed.
"""

import json
import os

import numpy as np
import pytest

from elm_jax.checkpoints import hf, loading, t5x
from elm_jax.models.t5_config import T5Config, param_shapes

SMALL = T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                 num_encoder_layers=2, num_decoder_layers=2)
TIED = SMALL.replace(mlp_activations=("relu",), logits_via_embedding=True)


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)

  def build(shapes):
    if isinstance(shapes, tuple):
      return rng.standard_normal(shapes).astype(np.float32)
    return {k: build(v) for k, v in shapes.items()}
  return build(param_shapes(config))


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def assert_same(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("config", [SMALL, TIED], ids=["v1_1", "original"])
def test_hf_round_trip(tmp_path, config):
  params = random_params(config)
  hf.save_hf_checkpoint(params, config, str(tmp_path / "ckpt"))
  loaded = hf.load_hf_checkpoint(str(tmp_path / "ckpt"))
  assert loaded.config == config
  assert_same(loaded.params, params)


def test_hf_sharded_round_trip_with_index(tmp_path):
  params = random_params(SMALL)
  hf.save_hf_checkpoint(params, SMALL, str(tmp_path / "ckpt"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "ckpt")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  assert_same(hf.load_hf_checkpoint(str(tmp_path / "ckpt")).params, params)


def test_hf_bfloat16_tensors_are_read(tmp_path):
  import ml_dtypes
  params = random_params(SMALL)
  hf.save_hf_checkpoint(params, SMALL, str(tmp_path / "ckpt"))
  # Rewrite the file in bfloat16, as many published checkpoints are.
  from safetensors.numpy import load_file
  tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
  header = {}
  blobs, offset = [], 0
  for name, t in tensors.items():
    data = t.astype(ml_dtypes.bfloat16).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  raw = json.dumps(header).encode()
  with open(tmp_path / "ckpt" / "model.safetensors", "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
  loaded = hf.load_hf_checkpoint(str(tmp_path / "ckpt"))
  expected = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in flat(params).items()}
  for k, v in flat(loaded.params).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)
    assert v.dtype == np.float32


def _edit_safetensors(path, edit):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_hf_missing_tensor(tmp_path):
  hf.save_hf_checkpoint(random_params(SMALL), SMALL, str(tmp_path / "c"))
  _edit_safetensors(str(tmp_path / "c" / "model.safetensors"),
                    lambda t: t.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"))
  with pytest.raises(hf.CheckpointError, match="missing tensor.*decoder.block.1.layer.2.DenseReluDense.wo.weight"):
    hf.load_hf_checkpoint(str(tmp_path / "c"))


def test_hf_mismatched_shape_names_file_tensor_and_shapes(tmp_path):
  hf.save_hf_checkpoint(random_params(SMALL), SMALL, str(tmp_path / "c"))
  def edit(t):
    t["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 15), np.float32)
  _edit_safetensors(str(tmp_path / "c" / "model.safetensors"), edit)
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_hf_checkpoint(str(tmp_path / "c"))
  message = str(e.value)
  assert "model.safetensors" in message and "SelfAttention.q.weight" in message
  assert "encoder/layers_0/attention/query/kernel" in message and "(16, 16)" in message


def test_hf_unexpected_tensor(tmp_path):
  hf.save_hf_checkpoint(random_params(SMALL), SMALL, str(tmp_path / "c"))
  _edit_safetensors(str(tmp_path / "c" / "model.safetensors"),
                    lambda t: t.__setitem__("encoder.block.2.layer.0.layer_norm.weight", np.ones(16, np.float32)))
  with pytest.raises(hf.CheckpointError, match="unexpected tensor 'encoder.block.2"):
    hf.load_hf_checkpoint(str(tmp_path / "c"))


def test_hf_config_the_model_cannot_represent(tmp_path):
  hf.save_hf_checkpoint(random_params(SMALL), SMALL, str(tmp_path / "c"))
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  config["feed_forward_proj"] = "gated-silu"
  (tmp_path / "c" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match="config.json: field 'feed_forward_proj' is 'gated-silu'"):
    hf.load_hf_checkpoint(str(tmp_path / "c"))


def test_pickle_checkpoints_are_refused_with_conversion_advice(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf_config()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(hf.CheckpointError, match="pytorch_model.bin.*Pickle.*safe_serialization=True"):
    hf.load_hf_checkpoint(str(tmp_path))


def test_missing_config_and_directory(tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json: not found"):
    hf.load_hf_checkpoint(str(tmp_path))
  with pytest.raises(hf.CheckpointError, match="checkpoint directory not found"):
    hf.load_hf_checkpoint(str(tmp_path / "nope"))


def test_save_refuses_to_clobber_and_replaces_atomically(tmp_path):
  target = tmp_path / "c"
  target.mkdir()
  (target / "keep.txt").write_text("mine")
  with pytest.raises(hf.CheckpointError, match="not empty"):
    hf.save_hf_checkpoint(random_params(SMALL), SMALL, str(target))
  assert (target / "keep.txt").read_text() == "mine"
  hf.save_hf_checkpoint(random_params(SMALL, 1), SMALL, str(target), overwrite=True)
  assert not (target / "keep.txt").exists()
  assert_same(hf.load_hf_checkpoint(str(target)).params, random_params(SMALL, 1))
  assert [p for p in os.listdir(tmp_path) if p.startswith(".hf-")] == []


# ------------------------------------------------------------------------- T5X legacy
def write_t5x_legacy(directory, params, step=1100000, inline=("encoder_norm", "decoder_norm")):
  """Writes params as t5x's Checkpointer does (see the module docstring)."""
  import tensorstore as ts
  from flax import serialization
  ckpt = os.path.join(directory, f"checkpoint_{step}")
  os.makedirs(ckpt)

  def written(tree, name):
    out = {}
    for k, v in tree.items():
      path = f"{name}/{k}"
      if isinstance(v, dict):
        out[k] = written(v, path)
      elif any(part in path for part in inline):
        out[k] = v  # unpartitioned: stored inline in the msgpack
      else:
        dotted = path.replace("/", ".")
        spec = {"driver": "zarr", "dtype": "float32",
                "kvstore": {"driver": "file", "path": dotted},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(v.shape),
                             "chunks": list(v.shape)}}
        store = ts.open({**spec, "kvstore": {"driver": "file", "path": os.path.join(ckpt, dotted)}},
                        create=True).result()
        store.write(v).result()
        out[k] = spec
    return out

  state = {"version": 3, "optimizer": {
      "target": written(params, "target"),
      "state": {"step": np.int32(step),
                "param_states": {"encoder": {"encoder_norm": {"scale": {"v": np.zeros(16, np.float32)}}}}}}}
  with open(os.path.join(ckpt, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return ckpt


def test_t5x_legacy_checkpoint_loads(tmp_path):
  params = random_params(SMALL)
  ckpt = write_t5x_legacy(str(tmp_path), params)
  assert os.path.isdir(os.path.join(ckpt, "target.encoder.layers_0.attention.query.kernel"))
  assert t5x.detect_checkpoint_format(ckpt) == "t5x_legacy"
  assert_same(t5x.load_t5x_checkpoint(ckpt, SMALL), params)
  # The parent directory resolves to its latest checkpoint_N.
  write_t5x_legacy(str(tmp_path), random_params(SMALL, 5), step=5)
  assert_same(t5x.load_t5x_checkpoint(str(tmp_path), SMALL), params)


def test_t5x_legacy_with_wrong_gin_config_is_a_clear_error(tmp_path):
  ckpt = write_t5x_legacy(str(tmp_path), random_params(SMALL))
  with pytest.raises(hf.CheckpointError, match="expected shape \\(64, 32\\), found \\(64, 16\\)"):
    t5x.load_t5x_checkpoint(ckpt, SMALL.replace(emb_dim=32))
  with pytest.raises(hf.CheckpointError, match="missing parameter encoder/layers_2"):
    t5x.load_t5x_checkpoint(ckpt, SMALL.replace(num_encoder_layers=3))


def test_t5x_legacy_missing_array_directory(tmp_path):
  import shutil
  ckpt = write_t5x_legacy(str(tmp_path), random_params(SMALL))
  shutil.rmtree(os.path.join(ckpt, "target.decoder.layers_1.mlp.wo.kernel"))
  with pytest.raises(hf.CheckpointError, match="target.decoder.layers_1.mlp.wo.kernel.*does not exist"):
    t5x.load_t5x_checkpoint(ckpt, SMALL)


def test_orbax_checkpoint_loads(tmp_path):
  import orbax.checkpoint as ocp
  params = random_params(TIED)
  ocp.PyTreeCheckpointer().save(str(tmp_path / "orbax"), {"target": params, "step": np.int32(7)})
  assert t5x.detect_checkpoint_format(str(tmp_path / "orbax")) == "orbax"
  assert_same(t5x.load_t5x_checkpoint(str(tmp_path / "orbax"), TIED), params)


def test_load_model_checkpoint_dispatches(tmp_path):
  params = random_params(SMALL)
  hf.save_hf_checkpoint(params, SMALL, str(tmp_path / "hf"))
  loaded = loading.load_model_checkpoint(str(tmp_path / "hf"), dtype="bfloat16")
  assert loaded.config.dtype == "bfloat16" and loaded.vocab_path is None
  ckpt = write_t5x_legacy(str(tmp_path / "t5x"), params)
  assert_same(loading.load_model_checkpoint(ckpt, config=SMALL).params, params)
  with pytest.raises(hf.CheckpointError, match="no config.json; pass a model gin file"):
    import gin
    gin.clear_config()
    loading.load_model_checkpoint(ckpt)
