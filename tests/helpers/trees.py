"""Comparisons of parameter trees that fail on a missing or extra leaf, naming it, before any
value is compared."""

import numpy as np

from elm_jax import tree_paths


def _paired(got, want) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(path, got leaf, want leaf) for every leaf, after checking both trees hold the same paths."""
  flat_got, flat_want = tree_paths.flatten(dict(got)), tree_paths.flatten(dict(want))
  missing = sorted(tree_paths.join(p) for p in set(flat_want) - set(flat_got))
  extra = sorted(tree_paths.join(p) for p in set(flat_got) - set(flat_want))
  assert not missing and not extra, f"leaves missing: {missing[:5]}; extra: {extra[:5]}"
  return [(tree_paths.join(p), np.asarray(flat_got[p]), np.asarray(flat_want[p])) for p in sorted(flat_want)]


def assert_trees_equal(got, want) -> None:
  """The same leaves with the same dtypes, shapes and values (bit for bit)."""
  for path, a, b in _paired(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b, err_msg=path)


def assert_trees_close(got, want, *, rtol: float, atol: float) -> None:
  """The same leaves and shapes, values within `atol + rtol * |want|`."""
  for path, a, b in _paired(got, want):
    assert a.shape == b.shape, (path, a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path)


def assert_trained_params_close(got, want, summed_lr: float, rtol: float = 1e-5) -> None:
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
  pairs = _paired(got, want)
  excess = np.concatenate([(np.abs(a.astype(np.float64) - b.astype(np.float64))
                            - rtol * np.abs(b.astype(np.float64))).ravel() for _, a, b in pairs])
  assert excess.max() <= 2 * summed_lr, excess.max()
  far = excess > 5e-3 * summed_lr
  assert far.sum() <= max(1, 1e-3 * far.size), (far.sum(), far.size, np.sort(excess)[-5:])
