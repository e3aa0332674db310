"""TensorFlow, for input pipelines only: imported lazily and kept off GPUs and TPUs (which JAX
owns), as t5x does at start-up; on a CPU backend its op thread pools are kept to one thread."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def tensorflow():
  """The `tensorflow` module, with its accelerators hidden (done once, before TF touches them)."""
  import jax
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  if jax.default_backend() == "cpu":
    # JAX computes on the same cores: TF's own op thread pools only take them away from it.
    try:
      tf.config.threading.set_intra_op_parallelism_threads(1)
      tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF's context is already initialised
      pass
  return tf
