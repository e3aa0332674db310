"""Tiny configs, random parameter trees and T5X checkpoint files for the checkpoint tests."""

import json
import os

import numpy as np
import tensorstore
from flax import serialization

from elm_jax.models.t5 import param_shapes
from elm_jax.models.t5_config import T5Config

GATED = T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                 num_encoder_layers=2, num_decoder_layers=2)
TIED = GATED.replace(mlp_activations=("relu",), logits_via_embedding=True)


def random_params(config, seed=0):
  """A float32 tree in our layout with the shapes `config` implies."""
  rng = np.random.default_rng(seed)

  def fill(node):
    if isinstance(node, dict):
      return {k: fill(v) for k, v in node.items()}
    return rng.standard_normal(node).astype(np.float32)

  return fill(param_shapes(config))


def _map_with_names(tree, fn, prefix):
  return {k: (_map_with_names(v, fn, f"{prefix}.{k}") if isinstance(v, dict)
              else fn(f"{prefix}.{k}", v)) for k, v in tree.items()}


def write_legacy_t5x(ckpt_dir, params, *, step=1100, kvstore="file", dtype=np.float32,
                     inline_1d=True, version=3):
  """Writes a T5X `Checkpointer` directory: msgpack `checkpoint` + one gzip zarr per array.

  Like t5x, arrays written to TensorStore are replaced in the msgpack by the JSON form of their
  relative `tensorstore.Spec`; with `inline_1d` the 1-D arrays (layer-norm scales) are stored inline as
  t5x does for unpartitioned arrays. `state` holds a step and Adafactor-like slots.
  """
  os.makedirs(ckpt_dir)

  def write(name, array, inline=inline_1d):
    array = np.asarray(array, dtype)
    if inline and array.ndim == 1:
      return array
    spec = {"driver": "zarr", "dtype": np.dtype(dtype).name,
            "kvstore": {"driver": "file", "path": name},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                         "chunks": [max(1, d // 2) for d in array.shape]}}
    absolute = json.loads(json.dumps(spec))
    absolute["kvstore"]["path"] = os.path.join(ckpt_dir, name)
    tensorstore.open(absolute, create=True, open=True).result().write(array).result()
    if kvstore == "gcs":
      spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": name}
    return tensorstore.Spec(spec).to_json()

  slots = _map_with_names(params, lambda n, a: {"v_row": np.ones(a.shape[:1], np.float32)}
                          if a.ndim == 1 else {"v_row": np.ones(a.shape[0], np.float32),
                                               "v_col": np.ones(a.shape[1], np.float32)}, "")
  state = {
      "target": _map_with_names(params, write, "target"),
      "state": {"step": np.asarray(step, np.int32),
                "param_states": _map_with_names(
                    slots, lambda n, a: write("state.param_states" + n, a, False)
                    if a.size > 20 else a, "")},
  }
  contents = state if version == 0 else {"version": version, "optimizer": state}
  with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
