"""Attention's two batched matmuls in two layouts: heads third ([batch, length, heads, head_dim],
as the projections produce them) against heads next to batch ([batch, heads, length, head_dim],
the layout `layers.MultiHeadAttention` and `minilm.BertSelfAttention` use). Same inputs, same
softmax and additive bias; the outputs are compared, and the forward pass and forward+backward
are timed.

Usage:
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_attention.py --repeats 5

Shapes (batch, length, heads, head_dim): the demo T5 (training batch and a scoring batch of 8
experts x 32 rows), MiniLM at key and query lengths, and T5-XL heads at length 512.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "demo T5, training batch": (32, 64, 4, 16),
    "demo T5, 8 experts x 32 rows": (256, 64, 4, 16),
    "MiniLM, 64 keys of 128 tokens": (64, 128, 12, 32),
    "MiniLM, 16 queries of 256 tokens": (16, 256, 12, 32),
    "T5-XL heads, 8 x 512 tokens": (8, 512, 32, 64),
}


def heads_third(q, k, v, bias):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def heads_second(q, k, v, bias):
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v), 1, 2)


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"# {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"jax {jax.__version__}; ms per call, mean of {args.repeats}")
  print("| shape (b, len, heads, d) | forward: heads third | heads second | speed-up | "
        "fwd+bwd: heads third | heads second | max abs diff |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for name, (b, length, h, d) in SHAPES.items():
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, h, length, length)), jnp.float32)
    row, outputs = [], []
    for attention in (heads_third, heads_second):
      forward = jax.jit(attention)
      backward = jax.jit(jax.grad(lambda q, k, v, bias, f=attention: jnp.sum(f(q, k, v, bias) ** 2),
                                  argnums=(0, 1, 2)))
      outputs.append(np.asarray(forward(q, k, v, bias)))
      row.append((_time(forward, (q, k, v, bias), args.repeats),
                  _time(backward, (q, k, v, bias), args.repeats)))
    (f3, b3), (f2, b2) = row
    diff = float(np.abs(outputs[0] - outputs[1]).max())
    print(f"| {name} {(b, length, h, d)} | {f3 * 1e3:.1f} | {f2 * 1e3:.1f} | {f3 / f2:.1f}x | "
          f"{b3 * 1e3:.1f} | {b2 * 1e3:.1f} | {diff:.1e} |")


if __name__ == "__main__":
  main()
