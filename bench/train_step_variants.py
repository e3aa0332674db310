"""Candidate speed-ups of the vmapped training step, measured against it in one process: the
head-to-head's training workload (bench/head_to_head.py: T5 v1.1 layout d_model 512, 6+6 layers,
vocabulary 32128; 8 adapter experts, batch 4 each, inputs 64 tokens (32-64 real), targets 16
(4-16 real), dropout 0.1, the paper's AdamW), 10 steps per timing, the variants timed round
robin so that a change of machine load hits each alike; best and spread of `--repeats`.

Variants (`--variants`, comma-separated; the first is the reference of the ratios):
  default       `train_step` as it ships: threefry dropout masks, the loss's gradient by
                `model.token_nll` (softmax - one-hot in one pass over the logits)
  plain_xent    the loss by autodiff of log_softmax and take_along_axis, and an argmax for the
                accuracy (the shipped loss before 2026-12-05)
  no_dropout    dropout 0: what every dropout mask costs together (not the paper's recipe)
  rbg           dropout keys of JAX's `rbg` PRNG (XLA's RngBitGenerator) instead of threefry
  unsafe_rbg    the same with `unsafe_rbg` (split and fold_in without the bit generator)
  fused_xent    `token_nll`'s gradient fused with the output projection's, for a frozen output
                kernel only (defined here, not shipped)
Each variant's losses are printed next to the default's (the PRNG variants draw other masks, so
theirs differ; plain_xent and fused_xent must match).

`--breakdown` instead profiles the default step (jax.profiler) and prints where its time goes:
the ops grouped by kind and the largest single ops.

`--masks` instead times the dropout masks of one step alone: 40 masks of [32, 8, 64, 64] (about
the step's 42M draws) from `layers.dropout_keep_mask` (threefry), from it with `rbg` keys, and
from a 32-bit integer hash of the element index (murmur3's finaliser, not shipped), best of 5.

`--matmuls` instead times the step's matmul shapes alone, in JAX and, with `--torch_python` (a
python with torch, bench/head_to_head.py's), in PyTorch, the two taking turns three times (best
of 3 x 3 x 20 calls per shape and side): whether the kernels themselves differ.

Usage: PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/train_step_variants.py
       [--variants default,no_dropout,rbg,unsafe_rbg,plain_xent,fused_xent] [--repeats 3]
       [--breakdown] [--masks] [--matmuls [--torch_python PATH]]
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from elm_jax.models.adapters import ExpertConfig, split_params  # noqa: E402
from elm_jax.models.model import EncoderDecoderModel, _token_nll_backward, _token_nll_forward  # noqa: E402
from elm_jax.models.t5 import init_params  # noqa: E402
from elm_jax.training import train_step as ts  # noqa: E402
from bench_train import best_seconds, measure_peak_flops  # noqa: E402  (bench/ is the script's directory)
from head_to_head import FULL, make_training_batches  # noqa: E402


# ----------------------------------------------------------------- the fused cross-entropy variant
@jax.custom_vjp
def _nll_and_top(hidden, kernel, targets):
  return _nll_forward(hidden, kernel, targets)[0]


def _nll_forward(hidden, kernel, targets):
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  outputs, nll_residuals = _token_nll_forward(logits, targets)
  return outputs, (kernel, nll_residuals)


def _nll_backward(residuals, cotangents):
  kernel, nll_residuals = residuals
  d_logits, _ = _token_nll_backward(nll_residuals, cotangents)  # token_nll's softmax - one-hot
  # The kernel is frozen: its cotangent is zeros, which XLA drops with the unused outputs.
  return jnp.dot(d_logits, kernel.T), jnp.zeros_like(kernel), None


_nll_and_top.defvjp(_nll_forward, _nll_backward)


class FusedCrossEntropyModel(EncoderDecoderModel):
  """The model with its loss computed by `_nll_and_top` from the decoder's hidden states."""

  def loss(self, params, batch, dropout_rng=None):
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    hidden, kernel = self.module.apply({"params": params}, batch["encoder_input_tokens"],
                                       batch["decoder_input_tokens"], deterministic=False, rngs=rngs,
                                       method=lambda m, enc, dec, **kw: m.decode(
                                           m.encode(enc, deterministic=False), enc != 0, dec,
                                           deterministic=False, project=False))
    targets = batch["decoder_target_tokens"]
    weights = (targets > 0).astype(jnp.float32)
    nll, top = _nll_and_top(hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1))
    tokens = weights.sum()
    loss = jnp.sum(nll * weights.reshape(-1)) / jnp.maximum(tokens, 1.0)
    accuracy = jnp.sum(top * weights.reshape(-1)) / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": tokens}


class PlainCrossEntropyModel(EncoderDecoderModel):
  """The model with its loss's gradient by autodiff of the plain formula, as shipped before
  `model.token_nll`."""

  def loss(self, params, batch, dropout_rng=None):
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    logits = self.module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                               deterministic=False, rngs=rngs)
    targets = batch["decoder_target_tokens"]
    weights = (targets > 0).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    tokens = weights.sum()
    loss = jnp.sum(nll * weights) / jnp.maximum(tokens, 1.0)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": tokens}


VARIANTS = ("default", "no_dropout", "rbg", "unsafe_rbg", "plain_xent", "fused_xent")


def build_step(name: str, config, expert_config, optimizer):
  dropout = 0.0 if name == "no_dropout" else FULL.training.dropout_rate
  model_class = {"fused_xent": FusedCrossEntropyModel, "plain_xent": PlainCrossEntropyModel}.get(
      name, EncoderDecoderModel)
  model = model_class(EncoderDecoderModel.build(config.replace(dropout_rate=dropout), expert_config).module)
  if name == "no_dropout":
    key = None
  elif name in ("rbg", "unsafe_rbg"):
    key = jax.random.key(0, impl=name)
  else:
    key = jax.random.PRNGKey(0)
  return jax.jit(functools.partial(ts.train_step, model=model, optimizer=optimizer, dropout_rng=key))


def breakdown(run, step) -> None:
  """Profiles one 10-step run of `step` (after one that compiles it) and prints its ops' time
  per step, grouped."""
  run(step)
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      run(step)
    events = json.load(gzip.open(glob.glob(f"{logdir}/plugins/profile/*/*.trace.json.gz")[0]))["traceEvents"]
  skip = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "CommonPjRt")
  ops = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and not event["name"].startswith(skip):
      ops[event["name"]] += event["dur"] / 1e3 / FULL.training.steps  # ms per step
  kinds = collections.Counter()
  for name, ms in ops.items():
    kinds[re.sub(r"[.\d]+$", "", name)] += ms
  wall = [e["dur"] for e in events if e.get("ph") == "X" and e["name"].startswith("ThunkExecutor::Execute (wait")]
  total = sum(ops.values())
  print(f"op time per step, summed over threads: {total:.0f} ms; the program's wall time per step: "
        f"{sum(wall) / 1e3 / FULL.training.steps:.0f} ms (ops run concurrently)")
  print("| op kind | ms per step | share |\n|---|---|---|")
  for kind, ms in kinds.most_common(12):
    print(f"| {kind} | {ms:.0f} | {ms / total:.1%} |")
  print("\nlargest single ops:\n| op | ms per step |\n|---|---|")
  for name, ms in ops.most_common(12):
    print(f"| {name} | {ms:.1f} |")


# [m, k] x [k, n] ("nn") or [m, k] x [n, k]^T ("nt"): the feed-forward and attention
# projections of 8 experts x 4 examples x 64 input tokens, forward and activation gradient, and
# the output projection of their 512 target tokens with its activation gradient.
MATMULS = (((2048, 512), (512, 1024), "nn"), ((2048, 1024), (512, 1024), "nt"),
           ((2048, 512), (1024, 512), "nt"), ((512, 512), (512, 32128), "nn"),
           ((512, 32128), (512, 32128), "nt"))

_MATMUL_TIMER = """
import json, sys, time
def best_ms(f, n=20):
  f(); best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(n): f()
    best = min(best, (time.perf_counter() - start) / n)
  return best * 1e3
if sys.argv[1] == "torch":
  import torch
  torch.set_grad_enabled(False)
  ones, sync = torch.ones, lambda y: y
else:
  import jax, jax.numpy as jnp
  ones, sync = jnp.ones, lambda y: y.block_until_ready()
out = []
for a, b, mode in json.loads(sys.argv[2]):
  x, y = ones(tuple(a)), ones(tuple(b))
  if sys.argv[1] == "torch":
    f = (lambda: x @ y) if mode == "nn" else (lambda: x @ y.T)
  else:
    g = jax.jit((lambda p, q: p @ q) if mode == "nn" else (lambda p, q: p @ q.T))
    f = lambda: sync(g(x, y))
  out.append(best_ms(f))
print(json.dumps(out))
"""


def matmuls(torch_python) -> None:
  """Times MATMULS alone in this process's JAX and, given `torch_python`, in PyTorch."""
  import subprocess
  shapes = json.dumps(MATMULS)
  sides = [("jax", sys.executable)] + ([("torch", torch_python)] if torch_python else [])
  results = {side: [float("inf")] * len(MATMULS) for side, _ in sides}
  for _ in range(3):  # the sides take turns, so that a change of machine load hits both
    for side, python in sides:
      out = subprocess.run([python, "-c", _MATMUL_TIMER, side, shapes], check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
      results[side] = [min(old, new) for old, new in zip(results[side], json.loads(out))]
  print("| matmul | GFLOP | " + " | ".join(f"{side} ms (GFLOP/s)" for side, _ in sides) + " |")
  print("|---|---|" + "---|" * len(sides))
  for i, (a, b, mode) in enumerate(MATMULS):
    flops = 2 * a[0] * a[1] * (b[1] if mode == "nn" else b[0])
    cells = " | ".join(f"{results[side][i]:.1f} ({flops / results[side][i] / 1e6:.0f})" for side, _ in sides)
    print(f"| {a} x {b}{'^T' if mode == 'nt' else ''} | {flops / 1e9:.2f} | {cells} |")


def masks() -> None:
  """Times one step's worth of dropout keep masks, three ways (see the module docstring)."""
  from elm_jax.models.layers import dropout_keep_mask
  shape, count, threshold = (32, 8, 64, 64), 40, round(0.1 * 65536)

  def shipped(key):
    return sum(dropout_keep_mask(k, 0.1, shape).sum(dtype=jnp.int32) for k in jax.random.split(key, count))

  def hashed(key):
    total = jnp.zeros((), jnp.int32)
    for k in jax.random.split(key, count):
      h = jax.lax.iota(jnp.uint32, np.prod(shape) // 2) * jnp.uint32(0x9E3779B9) + jax.random.bits(k, (), jnp.uint32)
      h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
      h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
      h = h ^ (h >> 16)
      total += (jnp.stack([h & 0xFFFF, h >> 16], -1) >= threshold).sum(dtype=jnp.int32)
    return total

  print(f"| masks of {count} x {list(shape)} | ms (best of 5) |\n|---|---|")
  for name, fn, key in (("threefry (shipped)", shipped, jax.random.PRNGKey(0)),
                        ("rbg keys", shipped, jax.random.key(0, impl="rbg")),
                        ("32-bit integer hash", hashed, jax.random.PRNGKey(0))):
    compiled = jax.jit(fn)
    print(f"| {name} | {best_seconds(lambda: compiled(key).block_until_ready()) * 1e3:.0f} |")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--masks", action="store_true")
  parser.add_argument("--matmuls", action="store_true")
  parser.add_argument("--torch_python", default=None)
  args = parser.parse_args()
  if args.matmuls:
    matmuls(args.torch_python)
    return 0
  if args.masks:
    masks()
    return 0
  names = args.variants.split(",")
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")

  config, expert_config, t = FULL.config, ExpertConfig(), FULL.training
  backbone, expert = split_params(nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert_config)),
                                  expert_config)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * t.experts), expert)
  batches = make_training_batches(config, t, seed=7)
  optimizer = ts.make_optimizer(ts.OptimizerConfig(), total_steps=t.steps)

  def run(step) -> np.ndarray:
    state = ts.init_train_state(stacked, optimizer)
    losses = []
    for i in range(t.steps):
      state, metrics = step(state, backbone, {k: v[:, i] for k, v in batches.items()})
      losses.append(metrics["loss"])
    jax.block_until_ready(state)
    return np.stack([np.asarray(x) for x in losses])

  if args.breakdown:
    breakdown(run, build_step("default", config, expert_config, optimizer))
    return 0
  steps = {name: build_step(name, config, expert_config, optimizer) for name in names}
  print(f"load average before: {os.getloadavg()[0]:.2f}; float32 matmul peak: {measure_peak_flops() / 1e9:.0f} GFLOP/s")
  for name, step in steps.items():  # compiles, and the losses each variant trains to
    losses = run(step)
    print(f"{name}: mean loss at step 1 {losses[0].mean():.6f}, at step {t.steps} {losses[-1].mean():.6f}")
  times = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      run(step)
      times[name].append(time.perf_counter() - start)
  reference = min(times[names[0]])
  print(f"\n| variant | best of {args.repeats} (s, {t.steps} steps) | spread (s) | x {names[0]} |\n|---|---|---|---|")
  for name, seconds in times.items():
    print(f"| {name} | {min(seconds):.2f} | {max(seconds) - min(seconds):.2f} | {min(seconds) / reference:.3f} |")
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
