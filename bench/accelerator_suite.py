"""The one-shot accelerator suite: what a lent GPU (or TPU) should measure, in one command that
finishes in under 9 minutes, written so that it works the first time.

    bench/accelerator_suite.sh                 # on the accelerator machine: figures into $OUT
    bench/accelerator_suite.sh --dry_run       # here, on CPU, with tiny shapes (one to two minutes)

Parts (each timed after its compilation, best of 3 repeats; FLOPs from XLA's cost analysis of
the compiled programs; MFU against the bfloat16 matmul peak measured in the same run):
1. training: E experts of T5-base (bfloat16 activations, float32 parameters and optimizer) in
   one vmapped step, against the same experts one at a time (tokens/s, MFU);
2. scoring: one pass over E experts against one expert at a time (examples/s, MFU);
3. the PyTorch head-to-head (`bench/head_to_head.py --device=cuda`) when PyTorch with CUDA is
   installed for `--torch_python`; otherwise the part says it was skipped and why;
4. the sharded evaluation sweep (`sweep_worker`, run first, in a child process of its own so
   that its devices' memory peaks are its own; in a dry run on 8 fake CPU devices): a library of
   E adapter experts (random weights over a random backbone saved as a Hugging Face checkpoint,
   added with `ExpertLibrary.add`) loaded as `eval` loads it, placed by `placement.choose` on
   every device (experts split over the mesh's `expert` axis; `--sweep_mesh` to choose the
   layout), and swept over the built-in suite's 12 held-out prompts by `sweep.run_sweep` (what
   `eval` runs: one unit per task, unit files, log.jsonl, TensorBoard scalars). Reported: the
   devices and the mesh, whether the scorer's expert leaves were really split over `expert`,
   the first pass (compiles, or reads JAX's compilation cache), a rerun (every unit skipped),
   best of 3 full recomputations (experts x examples per second), each device's peak memory
   (`memory_stats()`, where the backend reports it) and, on several devices, whether one
   device predicts the same.
Results: `$OUT/accelerator_suite.json` and `$OUT/accelerator_suite.md` (the markdown is also
printed), rewritten after every part, so a suite stopped by its time limit keeps the parts it
finished. What is not measured: input pipelines, checkpointing, host-device transfers of the
batches (they are placed on the device before timing; the sweep's times include moving each
chunk of experts to the devices, tokenizing, and writing its files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_train import compiled_flops  # noqa: E402  (bench/ is the script's directory)
from elm_jax import compile_cache, expert_stack  # noqa: E402
from elm_jax.checkpoints import expert_files, hf  # noqa: E402
from elm_jax.evaluation import expert_eval, placement, rank_scoring, sweep  # noqa: E402
from elm_jax.library.loaded import load_experts  # noqa: E402
from elm_jax.library.store import ExpertLibrary  # noqa: E402
from elm_jax.models.adapters import ExpertConfig, split_params  # noqa: E402
from elm_jax.models.model import EncoderDecoderModel  # noqa: E402
from elm_jax.models.t5 import init_params  # noqa: E402
from elm_jax.models.t5_config import T5Config  # noqa: E402
from elm_jax.training import train_step as ts  # noqa: E402
from elm_jax.training.trainer import initial_experts  # noqa: E402
from tasks import builtin_registry, instances  # noqa: E402

BASE = dict(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
            num_encoder_layers=12, num_decoder_layers=12)
TINY = dict(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_encoder_layers=2, num_decoder_layers=2)
# The sweep's model takes the built-in suite's vocabulary (1,000 SentencePiece pieces); its
# examples per task are one batch, so that each task compiles one scoring program (12 in all).
SWEEP_TINY = dict(TINY, vocab_size=1024, num_encoder_layers=1, num_decoder_layers=1)
FULL = {"config": BASE, "train_experts": 32, "train_batch": 8, "train_lengths": (256, 64), "train_steps": 3,
        "score_experts": 64, "score_examples": 256, "score_lengths": (256, 8), "peak_size": 8192,
        "sweep_config": BASE, "sweep_experts": 32, "sweep_examples": 32, "sweep_batch": 32,
        "sweep_lengths": (512, 128)}
DRY_DEVICES = 8  # fake CPU devices of the dry run's sweep
DRY = {"config": TINY, "train_experts": 4, "train_batch": 2, "train_lengths": (32, 8), "train_steps": 2,
       "score_experts": 4, "score_examples": 16, "score_lengths": (32, 4), "peak_size": 512,
       "sweep_config": SWEEP_TINY, "sweep_experts": DRY_DEVICES, "sweep_examples": 8, "sweep_batch": 8,
       "sweep_lengths": (64, 16)}
SWEEP_MIXTURE = "builtin_held_out"  # the built-in suite's 12 held-out rank-classification prompts
SWEEP_RESULT = "sweep_worker.json"


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


# ------------------------------------------------------------------ 4. the sharded sweep
def build_library(root: str, config: T5Config, num_experts: int) -> str:
  """A library at `root`/lib of `num_experts` adapter experts over a random backbone saved as a
  Hugging Face checkpoint (`root`/backbone, with the built-in suite's vocabulary): what `train`
  and `library add` leave, without the training (each expert is the paper's initialisation
  plus its own noise, so the experts disagree). Built on the host's CPU, so that no device
  memory is used before the sweep."""
  expert_config = ExpertConfig()
  try:
    host = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device, then
    host = jax.devices()[0]
  with jax.default_device(host):
    pretrained = jax.device_get(jax.jit(lambda key: nn.unbox(init_params(config, key)))(jax.random.PRNGKey(0)))
    _, stacked = initial_experts(config, expert_config, pretrained, num_experts, seed=1)
  checkpoint = os.path.join(root, "backbone")
  hf.save_hf_checkpoint(pretrained, config, checkpoint, vocab_path=builtin_registry.builtin_vocabulary())
  fingerprint = expert_files.backbone_fingerprint(hf.load_hf_checkpoint(checkpoint).params)
  rng = np.random.default_rng(2)
  library = ExpertLibrary(os.path.join(root, "lib"), create=True)
  for e in range(num_experts):
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x)[e] + rng.normal(0, 0.02, x.shape[1:]).astype(np.float32),
                                  stacked)
    meta = expert_files.ExpertMetadata(
        name=f"expert_{e:03d}", task="accelerator_suite", expert_config=dataclasses.asdict(expert_config),
        backbone_fingerprint=fingerprint,
        training_config={"backbone_checkpoint": checkpoint, "model": dataclasses.asdict(config)})
    directory = os.path.join(root, "experts", meta.name)
    expert_files.save_expert(directory, tree, meta)
    library.add(directory)
  return os.fspath(library.root)


@contextlib.contextmanager
def recording_placements(seen: list):
  """Records, for every expert chunk the scorer puts on the devices, (experts in the chunk, the
  experts one device holds of it, the devices it spans): what `expert_stack.place` returns."""
  real = expert_stack.place

  def recording(params, partitioner=None, specs=None):
    out = real(params, partitioner, specs)
    leaf = jax.tree_util.tree_leaves(out)[0]
    seen.append((leaf.shape[0], leaf.sharding.shard_shape(leaf.shape)[0], len(leaf.sharding.device_set)))
    return out
  expert_stack.place = recording
  try:
    yield seen
  finally:
    expert_stack.place = real


def device_memory(devices) -> list[dict]:
  """Each device's peak bytes in use (`memory_stats()`), or None where the backend reports none."""
  out = []
  for device in devices:
    try:
      stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics raise one of several errors
      stats = {}
    peak = stats.get("peak_bytes_in_use")
    out.append({"device": str(device), "peak_bytes": peak, "limit_bytes": stats.get("bytes_limit")})
  return out


def sweep_worker(args) -> dict:
  """The sharded sweep, in this process (started by `sweep_part`); see the module docstring."""
  shapes = DRY if args.dry_run else FULL
  compile_cache.enable()
  instances.ensure_registered([SWEEP_MIXTURE])
  tasks = expert_eval.member_tasks(SWEEP_MIXTURE)
  config = T5Config(**shapes["sweep_config"])
  batch, (max_input, max_target) = shapes["sweep_batch"], shapes["sweep_lengths"]
  with tempfile.TemporaryDirectory(prefix="elm_suite_sweep_") as root:
    began = time.perf_counter()
    lib = build_library(root, config, shapes["sweep_experts"])
    loaded = load_experts(lib)
    built = time.perf_counter() - began
    chosen = placement.choose(len(loaded.names), loaded.config, loaded.backbone, loaded.stack.params,
                              batch_size=batch, max_input_length=max_input, max_target_length=max_target,
                              mesh_config=placement.parse_mesh_flag(args.sweep_mesh), what="sweep")
    print(chosen.description, file=sys.stderr, flush=True)
    options = sweep.SweepOptions(max_examples=shapes["sweep_examples"], batch_size=batch, max_input_length=max_input,
                                 max_target_length=max_target, softmax_vocab_size=loaded.config.softmax_vocab_size)
    digests = {n: sweep.expert_digest(loaded.library.entry(n)["files"]) for n in loaded.names}

    def run(out, recompute=False, partitioner=chosen.partitioner, chunk=chosen.expert_chunk):
      said = io.StringIO()
      start = time.perf_counter()
      results = sweep.run_sweep(loaded, tasks, os.path.join(root, out), options=options, expert_digests=digests,
                                backbone_fingerprint=loaded.fingerprint, partitioner=partitioner,
                                expert_chunk=chunk, recompute=recompute, progress=False, stream=said)
      return results, time.perf_counter() - start, said.getvalue().strip().splitlines()[-1]

    seen: list = []
    with recording_placements(seen):
      results, first, first_line = run("sweep")
    _, resumed, resumed_line = run("sweep")
    times = [run("sweep", recompute=True)[1] for _ in range(3)]
    devices = (list(chosen.partitioner.mesh.devices.flat) if chosen.partitioner is not None
               else [jax.devices()[0]])
    memory = device_memory(devices)
    same = None
    if len(devices) > 1:
      print("sweep: once more on one device, to compare", file=sys.stderr, flush=True)
      one = run("one_device", partitioner=None, chunk=None)[0]
      pairs = [(a.predictions[n]["predictions"][e], b.predictions[n]["predictions"][e])
               for a, b in zip(results, one) for n in range(a.examples) for e in loaded.names]
      same = {"differ": sum(x != y for x, y in pairs), "of": len(pairs)}
    rows = [r for t in tasks for r in expert_eval.read_task_rows(t, options.split, options.max_examples)]
  ways = chosen.mesh_shape["expert"]
  examples = len(rows)
  return {"part": "sweep", "placement": chosen.description, "mesh": chosen.mesh_shape,
          "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
          "processes": jax.process_count(), "expert_chunk": chosen.expert_chunk,
          "experts": len(loaded.names), "tasks": len(tasks), "examples": examples,
          "choices": sum(len(r["answer_choices"]) for r in rows), "batch": batch,
          "model": "T5 base" if not args.dry_run else "T5 tiny", "library_seconds": built,
          "chunks_placed": len(seen),
          "split_over_experts": bool(seen) and all(shard * ways == size and spans == len(devices)
                                                   for size, shard, spans in seen),
          "first_seconds": first, "first_line": first_line, "resumed_seconds": resumed,
          "resumed_line": resumed_line, "seconds": min(times), "spread": max(times) - min(times),
          "pairs_per_s": len(loaded.names) * examples / min(times), "memory": memory,
          "same_as_one_device": same}


def sweep_part(args) -> dict:
  """Runs `sweep_worker` in a child process (in a dry run on DRY_DEVICES fake CPU devices),
  stopped after `--sweep_timeout` seconds; its result, or why there is none."""
  env = dict(os.environ)
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DRY_DEVICES}".strip()
  result = os.path.join(args.out, SWEEP_RESULT)
  if os.path.exists(result):
    os.remove(result)
  cmd = ([sys.executable, os.path.abspath(__file__), "--sweep_worker", f"--out={args.out}"] +
         (["--dry_run"] if args.dry_run else []) + ([f"--sweep_mesh={args.sweep_mesh}"] if args.sweep_mesh else []))
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.sweep_timeout)
  except subprocess.TimeoutExpired as e:
    tail = (e.stderr or b"")[-2000:]
    return {"part": "sweep", "skipped": f"stopped after {args.sweep_timeout} s (--sweep_timeout)",
            "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
  if out.returncode != 0 or not os.path.exists(result):
    last = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"part": "sweep", "skipped": f"the sweep worker failed (exit {out.returncode}): {last}; more in "
            "stderr_tail in accelerator_suite.json", "stderr_tail": out.stderr[-3000:]}
  with open(result) as f:
    return json.load(f)


def sweep_markdown(s: dict) -> list[str]:
  if "skipped" in s:
    return ["", f"Sharded evaluation sweep: skipped ({s['skipped']})."]
  mesh = s["mesh"]
  memory = ", ".join(f"{m['device']} {m['peak_bytes'] / 2**30:.2f} GiB"
                     + (f" of {m['limit_bytes'] / 2**30:.1f}" if m["limit_bytes"] else "")
                     for m in s["memory"] if m["peak_bytes"] is not None) or f"not reported ({s['device_kind']})"
  if s["same_as_one_device"] is None:
    same = "one device: nothing to compare"
  else:
    same = (f"predictions equal to one device's: {s['same_as_one_device']['of'] - s['same_as_one_device']['differ']} "
            f"of {s['same_as_one_device']['of']} (expert, example) pairs")
  pairs = s["experts"] * s["examples"]
  return ["", "### Sharded evaluation sweep", "",
          f"{len(s['devices'])} {s['device_kind']} device(s) in {s['processes']} process(es), mesh "
          f"{mesh['data']} data x {mesh['expert']} expert x {mesh['model']} model: `{s['placement']}`. "
          f"Expert leaves split over `expert` in all {s['chunks_placed']} chunks placed: {s['split_over_experts']}.",
          f"Workload: {s['experts']} adapter experts of {s['model']} (float32, random weights, a library on disk) "
          f"on `{SWEEP_MIXTURE}` ({s['tasks']} prompts x {s['examples'] // s['tasks']} examples = {s['examples']} "
          f"examples, {s['choices']} choices), batch {s['batch']}, {s['expert_chunk']} experts per pass; "
          f"`sweep.run_sweep` as `eval` runs it (a unit per task, its file, log and TensorBoard scalars). "
          f"Library built and loaded in {s['library_seconds']:.1f} s.", "",
          "| pass | seconds | experts x examples / s | what it said |", "|---|---|---|---|",
          f"| first (compiles, or reads the compilation cache) | {s['first_seconds']:.2f} | "
          f"{pairs / s['first_seconds']:.0f} | {s['first_line']} |",
          f"| rerun of the same sweep | {s['resumed_seconds']:.2f} | - | {s['resumed_line']} |",
          f"| recomputed, best of 3 (spread) | {s['seconds']:.2f} (+{s['spread']:.2f}) | {s['pairs_per_s']:.0f} | "
          f"{pairs} expert x example pairs |", "",
          f"Peak memory per device (the sweep's process): {memory}; {same}."]


def markdown(meta: dict, rows: list[dict], h2h: Optional[dict], sweep_result: Optional[dict]) -> str:
  """The report of the parts done so far (a part not yet done is left out)."""
  peak = f"{meta['peak_tflops']:.1f} TFLOP/s" if meta.get("peak_tflops") else "not measured yet"
  lines = [f"## Accelerator suite ({meta['date']})", "",
           f"Device: {meta['device']} x {meta['device_count']}, jax {meta['jax']}; bfloat16 matmul peak measured "
           f"in this run: {peak}; {'DRY RUN, tiny shapes' if meta['dry_run'] else 'full shapes'}.",
           f"Command: `{meta['command']}`", ""]
  if rows:
    lines += ["| part | mode | experts | shape | time (best, spread of 3) | throughput | MFU |",
              "|---|---|---|---|---|---|---|"]
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
  if vm:
    scoring_line = (f"; one-pass scoring {sc['one at a time']['seconds'] / sc['one pass']['seconds']:.2f}x "
                    f"(same predictions: {sc['one pass']['same_predictions']})." if sc else ".")
    lines += ["", f"Vmapped training is {vm['one at a time']['seconds_per_step'] / vm['vmapped']['seconds_per_step']:.2f}x "
              "one expert at a time" + scoring_line]
  if h2h is not None and "skipped" in h2h:
    lines += ["", f"Head to head with PyTorch: skipped ({h2h['skipped']})."]
  elif h2h is not None:
    lines += ["", f"Head to head with PyTorch (`{h2h['command']}`, exit {h2h['returncode']}):", "", h2h["table"]]
  if sweep_result is not None:
    lines += sweep_markdown(sweep_result)
  return "\n".join(lines) + "\n"


def write_results(out: str, meta: dict, rows: list[dict], h2h: Optional[dict], sweep_result: Optional[dict]) -> str:
  """Writes accelerator_suite.json and .md with the parts done so far; returns the markdown."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "accelerator_suite.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows, "head_to_head": h2h, "sweep": sweep_result}, f, indent=1)
  text = markdown(meta, rows, h2h, sweep_result)
  with open(os.path.join(out, "accelerator_suite.md"), "w") as f:
    f.write(text)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="accelerator_suite_out")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes (CPU): checks the suite end to end")
  parser.add_argument("--torch_python", default=os.environ.get("ELM_TORCH_PYTHON", os.path.join(REPO, ".venv-bench", "bin", "python")))
  parser.add_argument("--head_to_head_timeout", type=int, default=240)
  parser.add_argument("--sweep_mesh", default=None,
                      help="the sweep's mesh, data:D,expert:E,model:M as `eval --mesh` (default: every device, "
                           "chosen as `eval` chooses)")
  parser.add_argument("--sweep_timeout", type=int, default=150, help="seconds before the sweep part is stopped")
  parser.add_argument("--sweep_worker", action="store_true", help=argparse.SUPPRESS)  # the sweep's child process
  args = parser.parse_args()
  if args.sweep_worker:
    result = sweep_worker(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, SWEEP_RESULT), "w") as f:
      json.dump(result, f, indent=1)
    return
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  # First, before this process takes the device (and, on a GPU, most of its memory).
  sweep_result = sweep_part(args)
  print(f"sweep done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  compile_cache.enable()
  shapes = DRY if args.dry_run else FULL
  meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__, "peak_tflops": None,
          "dry_run": args.dry_run, "machine": platform.node(), "command": " ".join(["bench/accelerator_suite.sh"] + sys.argv[1:])}
  write_results(args.out, meta, [], None, sweep_result)
  peak = matmul_peak(shapes["peak_size"])
  meta["peak_tflops"] = peak / 1e12
  rows = training(shapes, peak)
  print(f"training done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  write_results(args.out, meta, rows, None, sweep_result)
  rows += scoring(shapes, peak)
  print(f"scoring done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  write_results(args.out, meta, rows, None, sweep_result)
  h2h = head_to_head(args)
  meta["seconds"] = time.perf_counter() - start
  text = write_results(args.out, meta, rows, h2h, sweep_result)
  print(text)
  print(f"suite took {meta['seconds']:.0f} s; results in {args.out}/", file=sys.stderr)


if __name__ == "__main__":
  main()
