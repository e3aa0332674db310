"""An expert's walk from `train` to `library add` to `retrieve` / `score` / `merge` / `eval`:
each command reads each expert's tensor file at most once and converts between the stacked
[E, ...] form and single expert trees at most once (counted by wrapping the one function that
reads an expert file and the ones that stack and index a stack)."""

from __future__ import annotations

import collections
import json
import os

import gin
import pytest

from elm_jax import expert_stack
from elm_jax.checkpoints import expert_files
from elm_jax.commands import cli

TASKS = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of"]


class Counter:
  """Counts expert-file reads (by directory) and stack conversions while a command runs."""

  def __init__(self, monkeypatch):
    self.reads = collections.Counter()
    self.stacked = 0
    self.indexed = 0
    load, stack, index = expert_files.load_expert, expert_stack.stack_trees, expert_stack.index

    def counted_load(directory, *args, **kwargs):
      self.reads[os.path.basename(os.fspath(directory))] += 1
      return load(directory, *args, **kwargs)

    def counted_stack(*args, **kwargs):
      self.stacked += 1
      return stack(*args, **kwargs)

    def counted_index(*args, **kwargs):
      self.indexed += 1
      return index(*args, **kwargs)
    monkeypatch.setattr(expert_files, "load_expert", counted_load)
    monkeypatch.setattr(expert_stack, "stack_trees", counted_stack)
    monkeypatch.setattr(expert_stack, "index", counted_index)

  def run(self, *argv) -> None:
    self.reads.clear()
    self.stacked = self.indexed = 0
    gin.clear_config()
    assert cli.main(list(argv)) == 0
    gin.clear_config()


def test_each_command_reads_each_expert_once_and_stacks_once(tmp_path, monkeypatch, capsys):
  counter = Counter(monkeypatch)
  run = tmp_path / "run"
  counter.run("train", "--no_progress", "--gin_file=models/t5_1_1_mini.gin",
              "--gin_file=runs/train_builtin_experts.gin", f"--gin.MODEL_DIR='{run}'",
              f"--gin.EXPERT_TASKS={TASKS!r}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
              "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=8",
              "--gin.t5_config.T5Config.num_encoder_layers=1", "--gin.t5_config.T5Config.num_decoder_layers=1")
  # Training exports each expert by indexing the trained stack once: no file read, no stacking.
  assert (counter.reads, counter.stacked, counter.indexed) == ({}, 0, len(TASKS))

  lib = tmp_path / "lib"
  counter.run("library", "add", f"--library={lib}", "--keys=none", str(run))
  assert counter.reads == {t: 1 for t in TASKS} and counter.stacked == 0  # each checked once

  inputs = tmp_path / "in.jsonl"
  inputs.write_text(json.dumps({"id": 0, "inputs": "Is it positive?", "choices": ["yes", "no"]}) + "\n")
  walk = {
      "score": ["score", f"--library={lib}", f"--input={inputs}", f"--output={tmp_path / 'o.jsonl'}"],
      "eval": ["eval", f"--library={lib}", "--task=builtin_nli_gpt3_style", f"--output_dir={tmp_path / 'ev'}",
               "--max_examples=4"],
      "retrieve": ["retrieve", f"--library={lib}", "--task=builtin_sentiment_rate_review",
                   "--method=likelihood", "--num_queries=4"],
      "merge": ["merge", f"--library={lib}", f"--experts={','.join(TASKS[:2])}", "--name=merged"],
  }
  for command, argv in walk.items():
    counter.run(*argv)
    # merge also reads the expert it wrote, once, as `library add` checks every expert it copies.
    used = TASKS[:2] + ["merged"] if command == "merge" else TASKS
    assert counter.reads == {t: 1 for t in used}, (command, counter.reads)
    assert counter.stacked == 1, (command, counter.stacked)  # stacked once, never restacked
    # Merging reads its members as one stack and averages over its leading axis; scoring and
    # evaluation slice the stack in chunks; none turns it back into single trees.
    assert counter.indexed == 0, (command, counter.indexed)
