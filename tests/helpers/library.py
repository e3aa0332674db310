"""Small expert directories and directory snapshots for the library tests."""

import hashlib
import os

import numpy as np

from elm_jax.checkpoints import expert_files

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
