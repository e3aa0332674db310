"""The trainer's input pipeline on this CPU: rows read by index in a per-epoch permutation
(`tasks.row_order`) against SeqIO's streamed reader with a 1,000-row shuffle buffer (the
pipeline before it), on the same P3-layout data (BENCHMARKS.md).

Usage (the project's environment):
  JAX_PLATFORMS=cpu .venv/bin/python bench/bench_row_order.py [--rows=50000] [--steps=300] [--write]

What is measured, in one process, on a P3 subset written by the script (`--rows` records in 4
TFRecord shards, inputs of 40-200 tokens, targets of 2-20, as a P3 training subset holds them):
(a) `p3.RecordIndex` built over the split (every record header walked): seconds;
(b) batches per second of one expert at batch 32, input 256 / target 128 tokens, through
    `inputs.expert_batches` (row_order: a permutation per epoch, rows read by index), from the
    first batch asked for (pipeline built, index built) to the `--steps`th;
(c) the same through SeqIO's `get_dataset(shuffle=True, shuffle_buffer_size=1000)` and the same
    feature conversion and batching (what the trainer read before row_order);
(d) (b) restarted at step 2,000 (a resume: no rows replayed), and (c) restarted there (the
    stream replayed to its step, as the trainer resumed before).
Each is run 3 times (fresh pipelines, the index rebuilt); best and spread (max - min). The
markdown goes to stdout; `--write` puts it into BENCHMARKS.md (one section per CPU model).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.bench_sweep import avx512  # noqa: E402
from bench.head_to_head import machine, write_section  # noqa: E402
from elm_jax import tf_input  # noqa: E402
from elm_jax.training import inputs  # noqa: E402
from elm_jax.training.config import TrainConfig  # noqa: E402
from tasks import p3  # noqa: E402

HEADING = "## Trainer input pipeline"
FEATURES = {"inputs": {"dtype": "int32", "shape": [None]},
            "inputs_pretokenized": {"dtype": "string", "shape": []},
            "targets": {"dtype": "int32", "shape": [None]},
            "targets_pretokenized": {"dtype": "string", "shape": []}}


def write_subset(root: str, rows: int, shards: int = 4) -> str:
  tf = tf_input.tensorflow()
  import json
  directory = os.path.join(root, "bench_subset")
  os.makedirs(directory)
  with open(os.path.join(directory, "info.train.json"), "w") as f:
    json.dump({"features": FEATURES}, f)
  rng = np.random.default_rng(0)
  for s in range(shards):
    with tf.io.TFRecordWriter(os.path.join(directory, f"train.tfrecord-{s:05d}-of-{shards:05d}")) as w:
      for i in range(s, rows, shards):
        ids = lambda n: tf.train.Feature(int64_list=tf.train.Int64List(value=rng.integers(3, 32000, n)))  # noqa: E731
        text = lambda t: tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))  # noqa: E731
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "inputs": ids(int(rng.integers(40, 200))), "inputs_pretokenized": text(f"row {i}"),
            "targets": ids(int(rng.integers(2, 20))), "targets_pretokenized": text("t")})).SerializeToString())
  return directory


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=50_000)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  tf = tf_input.tensorflow()
  import seqio
  root = tempfile.mkdtemp(prefix="bench_row_order_")
  directory = write_subset(root, args.rows)
  p3.register_p3_task("bench_subset", root)
  config = TrainConfig(model_dir=root, expert_tasks=("bench_subset",), steps=args.steps, batch_size=32,
                       input_length=256, target_length=128)
  lengths = {"inputs": 256, "targets": 128}

  def row_order_run(start_step: int = 0):
    from tasks import row_order
    row_order._READERS.clear()  # the index is rebuilt: part of what a run pays once
    stream = inputs.expert_batches(config, start_step=start_step)
    for _ in range(args.steps):
      next(stream)

  def seqio_run(start_step: int = 0):
    task = seqio.TaskRegistry.get("bench_subset")
    ds = task.get_dataset(sequence_length=lengths, split="train", shuffle=True, seed=1,
                          num_epochs=None, shuffle_buffer_size=1000)
    ds = inputs.unpacked_encdec_features(ds, lengths, "bench_subset").batch(32, drop_remainder=True)
    it = ds.as_numpy_iterator()
    for _ in range(start_step + args.steps):  # a resume replays the stream to its step
      next(it)

  results = {}
  for name, fn in [("index", lambda: p3.RecordIndex(directory, "train")), ("row_order", row_order_run),
                   ("seqio", seqio_run), ("resume", lambda: row_order_run(2_000)),
                   ("seqio_resume", lambda: seqio_run(2_000))]:
    times = [timed(fn) for _ in range(3)]
    results[name] = (min(times), max(times) - min(times))
    print(f"{name}: {results[name][0]:.3f} s (spread {results[name][1]:.3f})", file=sys.stderr)
  per = lambda k: args.steps / results[k][0]  # noqa: E731
  section = "\n".join([
      f"{HEADING} ({machine()}, {'with' if avx512() else 'without'} AVX-512, {datetime.date.today()})", "",
      f"`JAX_PLATFORMS=cpu .venv/bin/python bench/bench_row_order.py --rows={args.rows} --steps={args.steps}`,"
      f" tensorflow {tf.__version__}, on an otherwise idle machine. One expert, batch 32, inputs 256 /"
      f" targets 128 tokens, a P3-layout subset of {args.rows:,} records in 4 shards. Best of 3 (spread).", "",
      "| what | seconds | batches/s | vs SeqIO stream |", "|---|---|---|---|",
      f"| offset index of the split (`p3.RecordIndex`) | {results['index'][0]:.3f} ({results['index'][1]:.3f}) | | |",
      f"| row_order: {args.steps} batches from step 0, index included | {results['row_order'][0]:.3f} "
      f"({results['row_order'][1]:.3f}) | {per('row_order'):.1f} | {results['seqio'][0] / results['row_order'][0]:.2f}x |",
      f"| row_order: {args.steps} batches from step 2,000 (a resume) | {results['resume'][0]:.3f} "
      f"({results['resume'][1]:.3f}) | {per('resume'):.1f} | {results['seqio'][0] / results['resume'][0]:.2f}x |",
      f"| SeqIO stream, 1,000-row shuffle buffer (before) | {results['seqio'][0]:.3f} ({results['seqio'][1]:.3f}) "
      f"| {per('seqio'):.1f} | 1.00x |",
      f"| SeqIO stream resumed at step 2,000 (before: the stream replayed) | {results['seqio_resume'][0]:.3f} "
      f"({results['seqio_resume'][1]:.3f}) | {per('seqio_resume'):.1f} | "
      f"{results['seqio'][0] / results['seqio_resume'][0]:.2f}x |", ""])
  print(section)
  if args.write:
    write_section(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md", section, family=HEADING)
  return 0


if __name__ == "__main__":
  sys.exit(main())
