"""The one-shot accelerator suite: what a lent GPU (or TPU) should measure, in one command that
finishes in under 8 minutes, written so that it works the first time.

    bench/accelerator_suite.sh                 # on the accelerator machine: figures into $OUT
    bench/accelerator_suite.sh --dry_run       # here, on CPU, with tiny shapes (about a minute)

Parts (each timed after its compilation, best of 3 repeats; FLOPs from XLA's cost analysis of
the compiled programs; MFU against the bfloat16 matmul peak measured in the same run):
1. training: E experts of T5-base (bfloat16 activations, float32 parameters and optimizer) in
   one vmapped step, against the same experts one at a time (tokens/s, MFU);
2. scoring: one pass over E experts against one expert at a time (examples/s, MFU);
3. the PyTorch head-to-head (`bench/head_to_head.py --device=cuda`) when PyTorch with CUDA is
   installed for `--torch_python`; otherwise the part says it was skipped and why.
Results: `$OUT/accelerator_suite.json` and `$OUT/accelerator_suite.md` (the markdown is also
printed). What is not measured: input pipelines, checkpointing, host-device transfers of the
batches (they are placed on the device before timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_train import compiled_flops  # noqa: E402  (bench/ is the script's directory)
from elm_jax import compile_cache  # noqa: E402
from elm_jax.evaluation import rank_scoring  # noqa: E402
from elm_jax.models.adapters import ExpertConfig, split_params  # noqa: E402
from elm_jax.models.model import EncoderDecoderModel  # noqa: E402
from elm_jax.models.t5 import init_params  # noqa: E402
from elm_jax.models.t5_config import T5Config  # noqa: E402
from elm_jax.training import train_step as ts  # noqa: E402

BASE = dict(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
            num_encoder_layers=12, num_decoder_layers=12)
TINY = dict(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_encoder_layers=2, num_decoder_layers=2)
FULL = {"config": BASE, "train_experts": 32, "train_batch": 8, "train_lengths": (256, 64), "train_steps": 3,
        "score_experts": 64, "score_examples": 256, "score_lengths": (256, 8), "peak_size": 8192}
DRY = {"config": TINY, "train_experts": 4, "train_batch": 2, "train_lengths": (32, 8), "train_steps": 2,
       "score_experts": 4, "score_examples": 16, "score_lengths": (32, 4), "peak_size": 512}


def best_of(fn, repeats: int = 3) -> tuple[float, float]:
  """(best, spread) seconds of `repeats` calls of `fn` (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), max(times) - min(times)


def matmul_peak(size: int) -> float:
  """bfloat16 matmul FLOP/s of this device (float32 accumulation), best of 3 x 10 products."""
  a = jnp.ones((size, size), jnp.bfloat16)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()

  def ten():
    for _ in range(10):
      out = f(a)
    out.block_until_ready()
  best, _ = best_of(ten)
  return 10 * 2 * size ** 3 / best


def training(shapes: dict, peak: float) -> list[dict]:
  config = T5Config(**shapes["config"], dtype="bfloat16")
  expert_config = ExpertConfig()
  full = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert_config))
  backbone, expert = split_params(full, expert_config)
  backbone = jax.device_put(backbone)
  model = EncoderDecoderModel.build(config, expert_config)
  optimizer = ts.make_optimizer(ts.OptimizerConfig(), total_steps=1000)
  experts, batch, (li, lt) = shapes["train_experts"], shapes["train_batch"], shapes["train_lengths"]
  rng = np.random.default_rng(0)
  high = min(config.vocab_size, 30000)

  def data(group):
    targets = rng.integers(2, high, (group, batch, lt)).astype(np.int32)
    return jax.device_put({
        "encoder_input_tokens": rng.integers(2, high, (group, batch, li)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((group, batch, 1), np.int32), targets[..., :-1]], -1),
        "decoder_target_tokens": targets})
  step = jax.jit(lambda s, b, d: ts.train_step(s, b, d, model=model, optimizer=optimizer))
  rows = []
  for mode, group in (("vmapped", experts), ("one at a time", 1)):
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * group), expert)
    states = [ts.init_train_state(stacked, optimizer) for _ in range(experts // group)]
    batch_data = data(group)
    flops = compiled_flops(step, states[0], backbone, batch_data) * len(states)
    states = [step(s, backbone, batch_data)[0] for s in states]  # compile and warm up
    jax.block_until_ready(states)

    def run():
      nonlocal states
      for _ in range(shapes["train_steps"]):
        states = [step(s, backbone, batch_data)[0] for s in states]
      jax.block_until_ready(states)
    best, spread = best_of(run)
    per_step = best / shapes["train_steps"]
    tokens = experts * batch * (li + lt)
    rows.append({"part": "training", "mode": mode, "experts": experts, "batch": batch, "lengths": f"{li}/{lt}",
                 "seconds_per_step": per_step, "spread_per_step": spread / shapes["train_steps"],
                 "tokens_per_s": tokens / per_step, "mfu": flops / per_step / peak})
  return rows


def scoring(shapes: dict, peak: float) -> list[dict]:
  config = T5Config(**shapes["config"], dtype="bfloat16")
  expert_config = ExpertConfig()
  full = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert_config))
  backbone, expert = split_params(full, expert_config)
  model = EncoderDecoderModel.build(config, expert_config)
  experts = shapes["score_experts"]
  rng = np.random.default_rng(1)
  stacked = jax.tree_util.tree_map(
      lambda x: np.stack([np.asarray(x) + rng.normal(0, 0.01, x.shape).astype(np.float32) for _ in range(experts)]),
      expert)
  li, lt = shapes["score_lengths"]
  high = min(config.vocab_size, 30000)
  examples = [rank_scoring.Example(rng.integers(3, high, rng.integers(li // 2, li)).tolist(),
                                   [rng.integers(3, high, rng.integers(1, lt + 1)).tolist() for _ in range(4)])
              for _ in range(shapes["score_examples"])]
  rows, results = [], {}
  for mode, chunk in (("one pass", experts), ("one at a time", 1)):
    def run():
      results[mode] = rank_scoring.score_all_experts(model, backbone, stacked, examples, batch_size=32,
                                                     expert_chunk=chunk)[0]
    run()  # compile and warm up
    best, spread = best_of(run)
    rows.append({"part": "scoring", "mode": mode, "experts": experts, "examples": len(examples),
                 "seconds": best, "spread": spread, "examples_per_s": len(examples) / best})
  same = np.array_equal(np.argmax(results["one pass"], -1), np.argmax(results["one at a time"], -1))
  for row in rows:
    row["same_predictions"] = bool(same)
  del peak
  return rows


def head_to_head(args) -> dict:
  torch_python = args.torch_python
  probe = subprocess.run([torch_python, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True) if os.path.exists(torch_python) else None
  if probe is None or probe.returncode != 0:
    return {"part": "head to head", "skipped": f"no PyTorch at {torch_python} (pip install -e '.[bench]')"}
  if args.dry_run:
    cmd = [sys.executable, os.path.join(REPO, "bench", "head_to_head.py"), "--quick",
           f"--torch_python={torch_python}"]
  elif probe.stdout.strip() != "True":
    return {"part": "head to head", "skipped": "PyTorch has no CUDA device here"}
  else:
    cmd = [sys.executable, os.path.join(REPO, "bench", "head_to_head.py"), "--device=cuda",
           f"--torch_python={torch_python}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.head_to_head_timeout)
  return {"part": "head to head", "command": " ".join(cmd), "returncode": out.returncode,
          "table": out.stdout[-6000:], "stderr_tail": out.stderr[-2000:]}


def markdown(meta: dict, rows: list[dict], h2h: dict) -> str:
  lines = [f"## Accelerator suite ({meta['date']})", "",
           f"Device: {meta['device']} x {meta['device_count']}, jax {meta['jax']}; bfloat16 matmul peak measured "
           f"in this run: {meta['peak_tflops']:.1f} TFLOP/s; {'DRY RUN, tiny shapes' if meta['dry_run'] else 'full shapes'}.",
           f"Command: `{meta['command']}`", "",
           "| part | mode | experts | shape | time (best, spread of 3) | throughput | MFU |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["part"] == "training":
      lines.append(f"| training (T5 {'base' if not meta['dry_run'] else 'tiny'}, bf16) | {r['mode']} | {r['experts']} | "
                   f"batch {r['batch']} x {r['lengths']} | {r['seconds_per_step'] * 1e3:.1f} ms/step "
                   f"(+{r['spread_per_step'] * 1e3:.1f}) | {r['tokens_per_s']:.0f} tokens/s | {100 * r['mfu']:.1f}% |")
    else:
      lines.append(f"| scoring | {r['mode']} | {r['experts']} | {r['examples']} examples x 4 choices | "
                   f"{r['seconds']:.2f} s (+{r['spread']:.2f}) | {r['examples_per_s']:.1f} examples/s | - |")
  vm = {r["mode"]: r for r in rows if r["part"] == "training"}
  sc = {r["mode"]: r for r in rows if r["part"] == "scoring"}
  lines += ["", f"Vmapped training is {vm['one at a time']['seconds_per_step'] / vm['vmapped']['seconds_per_step']:.2f}x "
            f"one expert at a time; one-pass scoring {sc['one at a time']['seconds'] / sc['one pass']['seconds']:.2f}x "
            f"(same predictions: {sc['one pass']['same_predictions']})."]
  if "skipped" in h2h:
    lines += ["", f"Head to head with PyTorch: skipped ({h2h['skipped']})."]
  else:
    lines += ["", f"Head to head with PyTorch (`{h2h['command']}`, exit {h2h['returncode']}):", "", h2h["table"]]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="accelerator_suite_out")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes (CPU): checks the suite end to end")
  parser.add_argument("--torch_python", default=os.environ.get("ELM_TORCH_PYTHON", os.path.join(REPO, ".venv-bench", "bin", "python")))
  parser.add_argument("--head_to_head_timeout", type=int, default=240)
  args = parser.parse_args()
  compile_cache.enable()
  shapes = DRY if args.dry_run else FULL
  start = time.perf_counter()
  peak = matmul_peak(shapes["peak_size"])
  meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__, "peak_tflops": peak / 1e12,
          "dry_run": args.dry_run, "machine": platform.node(), "command": " ".join(["bench/accelerator_suite.sh"] + sys.argv[1:])}
  rows = training(shapes, peak)
  print(f"training done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  rows += scoring(shapes, peak)
  print(f"scoring done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  h2h = head_to_head(args)
  meta["seconds"] = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "accelerator_suite.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows, "head_to_head": h2h}, f, indent=1)
  text = markdown(meta, rows, h2h)
  with open(os.path.join(args.out, "accelerator_suite.md"), "w") as f:
    f.write(text)
  print(text)
  print(f"suite took {meta['seconds']:.0f} s; results in {args.out}/", file=sys.stderr)


if __name__ == "__main__":
  main()
