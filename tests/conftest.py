"""Shared test setup: 8 fake CPU devices for sharding tests, and tiny T5 configs."""

import os

# Must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from elm_jax import compile_cache  # noqa: E402
from elm_jax.models.t5_config import T5Config  # noqa: E402

# Compiled programs are kept between runs (`elm_jax/compile_cache.py`): a second `./elm test`
# on the same machine loads them instead of compiling them again.
compile_cache.enable()


@pytest.fixture(scope="session")
def tiny_config() -> T5Config:
  """T5 v1.1 shapes small enough to compile in seconds; divisible by a 4-way model axis."""
  return T5Config(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2)
