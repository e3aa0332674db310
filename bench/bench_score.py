"""Throughput of rank-classification scoring (`elm-jax score`'s engine) on random-weight models.

Usage: .venv/bin/python bench/bench_score.py [--configs tiny,small] [--examples 256]
Prints a markdown table: examples/s and choices/s after compilation, plus compile time.
"""

from __future__ import annotations

import argparse
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from elm_jax.evaluation import rank_scoring
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config

CONFIGS = {
    "tiny": T5Config(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                     num_encoder_layers=2, num_decoder_layers=2),
    "small": T5Config(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                      num_encoder_layers=8, num_decoder_layers=8),
}


def make_examples(config: T5Config, count: int, input_length: int, choices: int,
                  target_length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  high = min(config.vocab_size, 32000)
  return [rank_scoring.Example(
      list(rng.integers(3, high, rng.integers(input_length // 2, input_length))),
      [list(rng.integers(3, high, rng.integers(1, target_length))) for _ in range(choices)])
      for _ in range(count)]


def run(name: str, examples: int, batch_size: int, input_length: int, choices: int,
        target_length: int, dtype: str) -> dict:
  config = CONFIGS[name].replace(dtype=dtype)
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0)))
  scorer = rank_scoring.RankScorer(EncoderDecoderModel.build(config), params, batch_size=batch_size,
                                   max_input_length=input_length + 1, max_target_length=target_length + 1)
  data = make_examples(config, examples, input_length, choices, target_length)
  start = time.perf_counter()
  scorer.score(data[:batch_size])  # compiles every bucket the data will use (same length spread)
  scorer.score(data)
  warm = time.perf_counter() - start
  start = time.perf_counter()
  scorer.score(data)
  elapsed = time.perf_counter() - start
  return {"config": name, "dtype": dtype, "examples": examples, "batch": batch_size,
          "input_len": input_length, "choices": choices, "examples_per_s": examples / elapsed,
          "choices_per_s": examples * choices / elapsed, "first_pass_s": warm,
          "shapes": len(scorer.shapes_compiled)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--examples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--choices", type=int, default=4)
  parser.add_argument("--target_length", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}")
  print("| config | dtype | examples | batch | input len | choices | examples/s | choices/s | first pass (s, incl. compile) | compiled shapes |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    r = run(name, args.examples, args.batch_size, args.input_length, args.choices,
            args.target_length, args.dtype)
    print(f"| {r['config']} | {r['dtype']} | {r['examples']} | {r['batch']} | {r['input_len']} | "
          f"{r['choices']} | {r['examples_per_s']:.1f} | {r['choices_per_s']:.1f} | "
          f"{r['first_pass_s']:.1f} | {r['shapes']} |")


if __name__ == "__main__":
  main()
