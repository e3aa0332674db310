"""Shared test setup: 8 fake CPU devices for sharding tests, and tiny T5 configs."""

import os

# Must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from elm_jax.models.t5_config import T5Config  # noqa: E402

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN_VARIANTS = ("t5_v1_1", "t5_original", "mt5")


@pytest.fixture(scope="session")
def tiny_config() -> T5Config:
  """T5 v1.1 shapes small enough to compile in seconds; divisible by a 4-way model axis."""
  return T5Config(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2)


def assert_trained_params_close(got, want, summed_lr: float, rtol: float = 1e-5):
  """Parameter trees after a few optimizer steps along two code paths of ours (sharded against
  unsharded, vmapped against alone): equal up to float32 noise, which is not exact.

  The paths sum in different orders (~1e-7 relative), and the noise compounds over the steps.
  Adam steps by lr x m / (sqrt(v) + 1e-8), so at a gradient entry near 0 the noise can change a
  step by up to 2 lr: a few entries differ far more than the rest, by an amount no useful bound
  holds (in test_moe_t5, perturbing the experts by 1 ulp gives up to 3.7e-3 of 2e-2 summed lr,
  while 99.99% of 95k entries stay within 6e-5). So, in units of `summed_lr` (the learning
  rates of all steps added: what Adam can move an entry by, about) and beyond rtol x |want|
  (rounding of the parameter itself): no entry may differ by more than 2 x summed_lr, and at
  most 0.1% of the entries (or one) by more than 5e-3 x summed_lr. A real bug (a lost or
  misrouted gradient) moves most entries by more than that (one of 4 examples lost: 96%).
  """
  import jax
  import numpy as np
  got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(got) == len(want)
  excess = np.concatenate([(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                            - rtol * np.abs(np.asarray(b, np.float64))).ravel()
                           for a, b in zip(got, want)])
  assert excess.max() <= 2 * summed_lr, excess.max()
  far = excess > 5e-3 * summed_lr
  assert far.sum() <= max(1, 1e-3 * far.size), (far.sum(), far.size, np.sort(excess)[-5:])
