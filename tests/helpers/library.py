"""Small expert directories and directory snapshots for the library tests."""

import hashlib
import os

import flax.linen as nn
import jax
import numpy as np

from elm_jax.checkpoints import expert_files
from elm_jax.expert_stack import ExpertStack
from elm_jax.library.loaded import LoadedExperts
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from tasks import builtin_registry

FINGERPRINT = "f" * 32


def make_expert(root, name, seed, fingerprint=FINGERPRINT, task="task_a"):
  rng = np.random.default_rng(seed)
  params = {"encoder": {"layers_0": {"mlp_adapter": {"up_kernel": rng.normal(size=(4, 8)).astype(np.float32),
                                                     "up_bias": rng.normal(size=(8,)).astype(np.float32)}}}}
  meta = expert_files.ExpertMetadata(name=name, task=task, expert_config={"kind": "adapter"},
                                     backbone_fingerprint=fingerprint, steps=10)
  path = os.path.join(root, name)
  expert_files.save_expert(path, params, meta)
  return path


def snapshot(directory):
  """sha256 of every file under `directory` (relative path -> digest)."""
  out = {}
  for base, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(base, f)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def fake_loaded(root, names, keys=None, train_layer_norms=True):
  """Adapter experts that differ (expert e: a fresh initialisation shifted by 0.3 e) on a one-layer
  T5 over the built-in vocabulary, loaded as from a library at `root`/lib holding an entry of
  each name (`keys`: name -> retrieval key texts, or None for no keys)."""
  library = ExpertLibrary(os.path.join(root, "lib"), create=True)
  for i, name in enumerate(names):
    library.add(make_expert(os.path.join(root, "src"), name, i),
                keys=None if keys is None else [{"inputs": t} for t in keys[name]])
  config = T5Config(vocab_size=builtin_registry.VOCAB_SIZE, emb_dim=32, num_heads=4, head_dim=8,
                    mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
  expert_config = ExpertConfig(kind="adapter", reduction_factor=4, train_layer_norms=train_layer_norms)
  trees = []
  for seed in range(len(names)):
    backbone, expert = split_params(nn.unbox(init_params(config, jax.random.PRNGKey(seed), expert=expert_config)),
                                    expert_config)
    trees.append(jax.tree_util.tree_map(lambda x, s=seed: np.asarray(x) + 0.3 * s, expert))
  return LoadedExperts(EncoderDecoderModel.build(config, expert_config), backbone,
                       ExpertStack.from_trees(list(names), trees, expert_config),
                       builtin_registry.builtin_vocabulary(), library=library)
