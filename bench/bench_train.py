"""Expert training throughput: E experts vmapped in one step versus the same experts one after
another, tokens/s, model FLOPs utilisation against a measured matmul peak, peak memory.

Usage: PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_train.py [--configs tiny,small]
       [--experts 1,8,32] [--steps 5]
Each measurement runs in its own process so that its peak resident memory is its own.
Model FLOPs per example = 4 x (encoder parameters x input tokens + (decoder parameters + output
projection) x target tokens): a forward pass (2 per parameter per token) plus the backward pass
through the frozen backbone to the adapters (2 more; the backbone's weight gradients are not
computed). Embedding lookups and attention scores are not counted; expert parameters are
counted at 6 per token.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time

CONFIGS = {
    "tiny": dict(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                 num_encoder_layers=2, num_decoder_layers=2),
    "small": dict(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                  num_encoder_layers=8, num_decoder_layers=8),
}


def best_seconds(fn, repeats: int = 5) -> float:
  """The fastest of `repeats` calls of `fn` (after one untimed call that compiles it); `fn`
  blocks until its result is ready."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def measure_peak_flops() -> float:
  """float32 matmul FLOP/s on this machine (best of a few 1024^3 products)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * 1024 ** 3 / best_seconds(lambda: f(a).block_until_ready())


def compiled_flops(jitted, *args) -> float:
  """XLA's FLOP count of `jitted`'s program compiled for `args` (0 when the backend gives none)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def run_one(config_name: str, experts: int, mode: str, steps: int, batch: int, in_len: int,
            out_len: int) -> dict:
  import flax.linen as nn
  import jax
  import numpy as np
  from elm_jax.models.adapters import ExpertConfig, count_parameters, split_params
  from elm_jax.models.model import EncoderDecoderModel
  from elm_jax.models.t5 import init_params
  from elm_jax.models.t5_config import T5Config
  from elm_jax.training import train_step as ts

  config = T5Config(**CONFIGS[config_name])
  expert_cfg = ExpertConfig()
  full = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert_cfg))
  backbone, expert = split_params(full, expert_cfg)
  model = EncoderDecoderModel.build(config, expert_cfg)
  optimizer = ts.make_optimizer(ts.OptimizerConfig(), total_steps=steps + 1)
  group = experts if mode == "vmapped" else 1
  stacked = jax.tree_util.tree_map(lambda x: np.stack([x] * group), expert)
  rng = np.random.default_rng(0)
  targets = rng.integers(2, min(config.vocab_size, 30000), (group, batch, out_len)).astype(np.int32)
  data = {"encoder_input_tokens": rng.integers(2, min(config.vocab_size, 30000), (group, batch, in_len)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((group, batch, 1), np.int32), targets[..., :-1]], -1),
          "decoder_target_tokens": targets}
  step = jax.jit(functools.partial(ts.train_step, model=model, optimizer=optimizer))
  states = [ts.init_train_state(stacked, optimizer) for _ in range(experts // group)]
  start = time.perf_counter()
  states = [step(s, backbone, data)[0] for s in states]  # compile + first step
  jax.block_until_ready(states)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    states = [step(s, backbone, data)[0] for s in states]
  jax.block_until_ready(states)
  elapsed = time.perf_counter() - start
  tokens = experts * batch * (in_len + out_len) * steps
  examples = experts * batch * steps
  encoder_params = count_parameters(backbone["encoder"])
  decoder_params = count_parameters(backbone["decoder"]) + (
      config.vocab_size * config.emb_dim if config.logits_via_embedding else 0)
  flops = examples * 4 * (encoder_params * in_len + decoder_params * out_len) + tokens * 6 * count_parameters(expert)
  return {"config": config_name, "experts": experts, "mode": mode, "tokens_per_s": tokens / elapsed,
          "flops_per_s": flops / elapsed, "first_step_s": compile_s,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--experts", default="1,8,32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--target_length", type=int, default=16)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    name, experts, mode = args.one.split(":")
    print(json.dumps(run_one(name, int(experts), mode, args.steps, args.batch, args.input_length,
                             args.target_length)))
    return
  import jax
  peak = measure_peak_flops()
  print(f"device: {jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}; "
        f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s; batch {args.batch} per expert, "
        f"input {args.input_length}, target {args.target_length}, {args.steps} timed steps")
  print("| config | experts | mode | tokens/s | MFU | first step (s, incl. compile) | peak RSS (MiB) |")
  print("|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    for experts in (int(e) for e in args.experts.split(",")):
      for mode in ("vmapped", "sequential"):
        if mode == "sequential" and experts == 1:
          continue
        out = subprocess.run([sys.executable, __file__, f"--one={name}:{experts}:{mode}",
                              f"--steps={args.steps}", f"--batch={args.batch}",
                              f"--input_length={args.input_length}", f"--target_length={args.target_length}"],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {experts} | {mode} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['flops_per_s'] / peak:.1f}% | {r['first_step_s']:.1f} | {r['peak_rss_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
  main()
