"""TensorFlow, for input pipelines only: imported lazily and kept off GPUs and TPUs (which JAX
owns), as t5x does at start-up."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def tensorflow():
  """The `tensorflow` module, with its accelerators hidden (done once, before TF touches them)."""
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  return tf
