"""Where the vmapped training step's time goes on CPU: the head-to-head's training workload (T5
v1.1 layout d_model 512, 6+6 layers, vocabulary 32128; 8 adapter experts, batch 4, 64 + 16
tokens) timed whole, without dropout, and forward only, each with XLA's FLOP count of the
compiled program and its FLOP/s against a float32 matmul measured in the same run (MFU).

Usage: PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/profile_train_step.py
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from elm_jax.models.adapters import ExpertConfig, merge_params, split_params  # noqa: E402
from elm_jax.models.model import EncoderDecoderModel  # noqa: E402
from elm_jax.models.t5 import init_params  # noqa: E402
from elm_jax.models.t5_config import T5Config  # noqa: E402
from elm_jax.training import train_step as ts  # noqa: E402
from bench_train import compiled_flops, measure_peak_flops  # noqa: E402  (bench/ is the script's directory)

E, B, LI, LT = 8, 4, 64, 16
CONFIG = T5Config(vocab_size=32128, emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024,
                  num_encoder_layers=6, num_decoder_layers=6)


def main():
  expert_config = ExpertConfig()
  full = nn.unbox(init_params(CONFIG, jax.random.PRNGKey(0), expert=expert_config))
  backbone, expert = split_params(full, expert_config)
  rng = np.random.default_rng(0)
  targets = rng.integers(3, 30000, (E, B, LT)).astype(np.int32)
  data = {"encoder_input_tokens": rng.integers(3, 30000, (E, B, LI)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((E, B, 1), np.int32), targets[..., :-1]], -1),
          "decoder_target_tokens": targets}
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * E), expert)
  peak = measure_peak_flops()
  print(f"float32 matmul (1024^3) in this run: {peak / 1e9:.0f} GFLOP/s")
  print("| program | ms per step (best of 3 x 3) | GFLOP (XLA) | GFLOP/s | MFU |\n|---|---|---|---|---|")
  for name, dropout, forward_only in (("train step, dropout 0.1", 0.1, False),
                                      ("train step, no dropout", 0.0, False),
                                      ("forward (loss) only, no dropout", 0.0, True)):
    model = EncoderDecoderModel.build(CONFIG.replace(dropout_rate=dropout), expert_config)
    optimizer = ts.make_optimizer(ts.OptimizerConfig(), total_steps=100)
    if forward_only:
      fn = jax.jit(lambda s, b, d: jax.vmap(lambda p, x: model.loss(merge_params(b, p), x, None)[0])(s.params, d))
    else:
      fn = jax.jit(functools.partial(ts.train_step, model=model, optimizer=optimizer,
                                     dropout_rng=jax.random.PRNGKey(0) if dropout else None))
    state = ts.init_train_state(stacked, optimizer)
    flops = compiled_flops(fn, state, backbone, data)
    jax.block_until_ready(fn(state, backbone, data))
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      for _ in range(3):
        out = fn(state, backbone, data)
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - start) / 3)
    print(f"| {name} | {best * 1e3:.0f} | {flops / 1e9:.0f} | {flops / best / 1e9:.0f} | {flops / best / peak:.0%} |",
          flush=True)


if __name__ == "__main__":
  main()
