"""Mixture-of-Experts T5 against the dense T5 at equal active FLOPs: train-step time, tokens/s,
and the fraction of token choices dropped at each capacity factor.

Usage:
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_moe.py --config small --steps 5

Models (random weights, full fine-tuning with AdamW through the project's `train_step`, one
compiled step, timed after a warm-up step):
  dense          the T5 1.1 config
  switch-8       8 experts in every other feed-forward layer, top-1, experts as wide as the
                 dense MLP (active FLOPs = dense + router), capacity factor 1.25
  top2-8         8 experts, top-2 (GShard, renormalised gates), experts half as wide (equal
                 active FLOPs), capacity factor 1.25
  expert-choice  8 experts, expert choice with capacity factor 2 (two experts per token on
                 average), experts half as wide
Tokens/s counts input + target tokens of the batch. Drops: fraction of token choices the
Switch layers dropped in one training-mode forward pass (random router, the worst case an
upcycled model starts from), mean over the sparse layers, per capacity factor.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from bench.bench_score import CONFIGS
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.moe import MoeConfig, router_losses_and_metrics
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import Transformer, init_params
from elm_jax.training import train_step as ts

FULL = ExpertConfig(kind="full")


def variants(mlp_dim: int, group: int) -> dict[str, MoeConfig | None]:
  half = mlp_dim // 2
  return {
      "dense": None,
      "switch-8": MoeConfig(num_experts=8, max_group_size=group),
      "top2-8": MoeConfig(num_experts=8, num_selected_experts=2, normalize_gates=True,
                          expert_mlp_dim=half, max_group_size=group),
      "expert-choice": MoeConfig(num_experts=8, router="expert_choice", train_capacity_factor=2.0,
                                 expert_mlp_dim=half, max_group_size=group),
  }


def make_batch(config, batch: int, inputs: int, targets: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  high = min(config.vocab_size, 32000)
  target = rng.integers(2, high, (1, batch, targets)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, high, (1, batch, inputs)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((1, batch, 1), np.int32), target[..., :-1]], -1),
          "decoder_target_tokens": target}


def time_steps(config, batch, steps: int) -> tuple[float, float]:
  """(seconds per step, compile seconds) for full fine-tuning of `config`."""
  params = jax.tree_util.tree_map(lambda x: x[None], nn.unbox(init_params(config, jax.random.PRNGKey(0))))
  optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-4), total_steps=steps + 1)
  step = jax.jit(functools.partial(ts.train_step, model=EncoderDecoderModel.build(config, FULL), optimizer=optimizer))
  state = ts.init_train_state(params, optimizer)
  start = time.perf_counter()
  state, metrics = step(state, {}, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, {}, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, compile_s


def dropped(config, batch, factor: float) -> float:
  config = config.replace(moe=MoeConfig(num_experts=8, train_capacity_factor=factor,
                                        max_group_size=config.moe.max_group_size))
  model = Transformer(config)
  params = init_params(config, jax.random.PRNGKey(1))

  @jax.jit
  def forward(params):
    _, state = model.apply({"params": nn.unbox(params)}, batch["encoder_input_tokens"][0],
                           batch["decoder_input_tokens"][0], deterministic=False, mutable=["intermediates"])
    return router_losses_and_metrics(state, config.moe)[1]["fraction_dropped"]
  return float(forward(params))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--input_length", type=int, default=256)
  parser.add_argument("--target_length", type=int, default=64)
  parser.add_argument("--group_size", type=int, default=512)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  base = CONFIGS[args.config]
  batch = make_batch(base, args.batch, args.input_length, args.target_length)
  tokens = args.batch * (args.input_length + args.target_length)
  print(f"{args.config} config, batch {args.batch} x ({args.input_length} + {args.target_length}) tokens, "
        f"token groups of {args.group_size}; {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}\n")
  print("| model | parameters | step (s) | tokens/s | compile (s) |\n|---|---|---|---|---|")
  for name, moe in variants(base.mlp_dim, args.group_size).items():
    config = base.replace(moe=moe)
    count = sum(x.size for x in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda c=config: nn.unbox(init_params(c, jax.random.PRNGKey(0))))))
    seconds, compile_s = time_steps(config, batch, args.steps)
    print(f"| {name} | {count / 1e6:.1f}M | {seconds:.3f} | {tokens / seconds:,.0f} | {compile_s:.1f} |", flush=True)
  print("\n| capacity factor | Switch-8 token choices dropped |\n|---|---|")
  switch = base.replace(moe=variants(base.mlp_dim, args.group_size)["switch-8"])
  for factor in (0.5, 1.0, 1.25, 2.0):
    print(f"| {factor} | {100 * dropped(switch, batch, factor):.1f}% |", flush=True)


if __name__ == "__main__":
  main()
