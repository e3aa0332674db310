"""Expert Library benchmarks: one-pass scoring of E experts versus one expert at a time, and
retrieval latency at the paper's scale (296 experts x 100 keys, 32 queries).

Usage:
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_library.py scoring --configs tiny,small --experts 1,8,32,64
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/bench_library.py retrieval

Scoring: random-weight backbone, adapter experts (the paper's recipe) with random weights,
written to expert directories first. "one pass": the experts are loaded and stacked once and
`score_all_experts` scores every example with every expert (`--expert_chunk` experts per device
program). "one at a time": for each expert, load its files, merge it into the backbone and score
all examples with `RankScorer` (compiled once; later experts reuse the program). Times are after
a warm-up run that compiles every shape. Overhead per added expert = (time(E) - time(1)) / (E - 1).

Retrieval: a library of 296 experts with 100 cached 384-d key embeddings each (random unit
vectors, so the timing excludes the one-off key embedding, which is measured separately per
1000 keys); 32 queries embedded with MiniLM at max length 512, top-1 search and votes. BM25 over
the same number of key texts is timed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from bench.bench_score import CONFIGS, make_examples
from elm_jax.evaluation import rank_scoring
from elm_jax.checkpoints import expert_files
from elm_jax.expert_stack import ExpertStack
from elm_jax.library import retrieval
from elm_jax.models.adapters import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.training.trainer import initial_experts


def _write_experts(directory, config, num_experts):
  expert_config = ExpertConfig()
  pretrained = nn.unbox(init_params(config, jax.random.PRNGKey(0)))
  backbone, stacked = initial_experts(config, expert_config, pretrained, num_experts, seed=1, shared_init=False)
  rng = np.random.default_rng(0)
  stacked = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.02, x.shape).astype(np.float32), stacked)
  paths = []
  for e in range(num_experts):
    meta = expert_files.ExpertMetadata(name=f"e{e}", task="bench", expert_config={"kind": "adapter"},
                                       backbone_fingerprint="bench")
    path = os.path.join(directory, f"e{e}")
    expert_files.save_expert(path, jax.tree_util.tree_map(lambda x: np.asarray(x)[e], stacked), meta)
    paths.append(path)
  return EncoderDecoderModel.build(config, expert_config), backbone, paths


def _load_stacked(paths):
  return ExpertStack.load([os.path.basename(p) for p in paths], paths)[0].params


def time_one_pass(model, backbone, paths, examples, batch_size, chunk, max_in, max_t):
  start = time.perf_counter()
  stacked = _load_stacked(paths)
  rank_scoring.score_all_experts(model, backbone, stacked, examples, batch_size=batch_size,
                                 expert_chunk=chunk, max_input_length=max_in, max_target_length=max_t)
  return time.perf_counter() - start


def time_one_at_a_time(model, backbone, paths, examples, batch_size, max_in, max_t):
  start = time.perf_counter()
  for path in paths:
    params = merge_params(backbone, expert_files.load_expert(path)[0])
    scorer = rank_scoring.RankScorer(model, params, batch_size=batch_size, max_input_length=max_in,
                                     max_target_length=max_t)
    scorer.score(examples)
  return time.perf_counter() - start


def scoring(args):
  print("| config | experts | examples | mode | expert chunk | time (s) | examples/s | expert-examples/s | overhead per added expert (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    config = CONFIGS[name]
    n = args.examples_tiny if name == "tiny" else args.examples_small
    examples = make_examples(config, n, args.input_length, args.choices, args.target_length)
    max_in, max_t = args.input_length + 1, args.target_length + 1
    counts = [int(e) for e in args.experts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
      model, backbone, paths = _write_experts(tmp, config, max(counts))
      base = {}
      for num in counts:
        chunk = min(num, args.expert_chunk)
        # Warm-up compiles the shapes of this expert chunk and of the single-expert scorer.
        time_one_pass(model, backbone, paths[:num], examples[:args.batch_size], args.batch_size, chunk, max_in, max_t)
        time_one_at_a_time(model, backbone, paths[:1], examples[:args.batch_size], args.batch_size, max_in, max_t)
        for mode in ("one pass", "one at a time"):
          if mode == "one pass":
            elapsed = time_one_pass(model, backbone, paths[:num], examples, args.batch_size, chunk, max_in, max_t)
          else:
            elapsed = time_one_at_a_time(model, backbone, paths[:num], examples, args.batch_size, max_in, max_t)
          base.setdefault(mode, elapsed if num == 1 else None)
          overhead = "" if num == 1 or base[mode] is None else f"{(elapsed - base[mode]) / (num - 1):.3f}"
          print(f"| {name} | {num} | {n} | {mode} | {chunk if mode == 'one pass' else 1} | {elapsed:.2f} | "
                f"{n / elapsed:.1f} | {n * num / elapsed:.1f} | {overhead} |", flush=True)


def retrieval_latency(args):
  from elm_jax.library.store import ExpertLibrary
  rng = np.random.default_rng(0)
  texts = [f"Answer Choices: yes, no, Instance: Review {i}: the {w} was " + " ".join(
      rng.choice(["good", "bad", "great", "poor", "fine", "cheap", "new", "old"], 20)) for i, w in
      enumerate(rng.choice(["lamp", "phone", "chair", "watch"], 1000))]
  embedder = retrieval.MiniLMTextEmbedder()
  embedder.embed(texts[:64], retrieval.KEY_MAX_LENGTH)
  start = time.perf_counter()
  embedder.embed(texts, retrieval.KEY_MAX_LENGTH)
  per_1000_keys = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    lib = ExpertLibrary(os.path.join(tmp, "lib"), create=True)
    names = []
    start = time.perf_counter()
    src = os.path.join(tmp, "src")
    for e in range(args.num_experts):
      meta = expert_files.ExpertMetadata(name=f"expert_{e:03d}", task="bench", expert_config={"kind": "adapter"},
                                         backbone_fingerprint="bench")
      expert_files.save_expert(os.path.join(src, meta.name), {"a": np.zeros(4, np.float32)}, meta)
      lib.add(os.path.join(src, meta.name), keys=[{"inputs": texts[(e * 7 + k) % len(texts)]}
                                                  for k in range(args.keys_per_expert)])
      block = rng.normal(size=(args.keys_per_expert, 384)).astype(np.float32)
      block /= np.linalg.norm(block, axis=1, keepdims=True)
      path = lib.embeddings_path(meta.name, "minilm", "label_instance")
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(os.fspath(path), block)
      names.append(meta.name)
    build = time.perf_counter() - start
    queries = [{"inputs": t, "answer_choices": ["yes", "no"]} for t in texts[:args.num_queries]]
    retrieval.roe_ranking(lib, names, queries, embedder=embedder)  # compiles the query shapes
    timings = {}
    for label, kwargs in (("RoE, MiniLM (cached keys)", {"embedder": embedder}), ("RoE, BM25", {"bm25": True})):
      start = time.perf_counter()
      retrieval.roe_ranking(lib, names, queries, **kwargs)
      timings[label] = time.perf_counter() - start
    start = time.perf_counter()
    keys, owners = retrieval.key_embeddings(lib, names, embedder, "label_instance")
    load = time.perf_counter() - start
    query_vectors = embedder.embed([f"Answer Choices: yes, no, Instance: {q['inputs']}" for q in queries],
                                   retrieval.QUERY_MAX_LENGTH)
    start = time.perf_counter()
    retrieval.vote_ranking(query_vectors @ keys.T, owners, names)
    search = time.perf_counter() - start
  print("| experts x keys | queries | step | time (s) |\n|---|---|---|---|")
  k = args.num_experts * args.keys_per_expert
  print(f"| {args.num_experts} x {args.keys_per_expert} | - | build the library (add + write key caches) | {build:.2f} |")
  print(f"| - | - | embed 1000 keys with MiniLM (max len 256), one-off per expert | {per_1000_keys:.2f} |")
  print(f"| {args.num_experts} x {args.keys_per_expert} | - | read {k} cached key embeddings | {load:.3f} |")
  print(f"| {args.num_experts} x {args.keys_per_expert} | {args.num_queries} | top-1 search + votes (embedded queries) | {search:.4f} |")
  for label, t in timings.items():
    print(f"| {args.num_experts} x {args.keys_per_expert} | {args.num_queries} | {label}, end to end | {t:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("which", choices=("scoring", "retrieval"))
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--experts", default="1,8,32,64")
  parser.add_argument("--expert_chunk", type=int, default=16)
  parser.add_argument("--examples_tiny", type=int, default=256)
  parser.add_argument("--examples_small", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--choices", type=int, default=2)
  parser.add_argument("--target_length", type=int, default=4)
  parser.add_argument("--num_experts", type=int, default=296)
  parser.add_argument("--keys_per_expert", type=int, default=100)
  parser.add_argument("--num_queries", type=int, default=32)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({platform.processor() or platform.machine()}), jax {jax.__version__}")
  scoring(args) if args.which == "scoring" else retrieval_latency(args)


if __name__ == "__main__":
  main()
