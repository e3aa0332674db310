"""`elm-jax train`: gin-configured expert (or multitask-baseline) training.

    elm-jax train --gin_file=gin_configs/runs/train_experts.gin \
        --gin.MODEL_DIR="'/tmp/experts'" --gin.EXPERT_TASKS="['task_a', 'task_b']"

The run file binds `elm_jax.training.run.train` (t5x style); model files bind MODEL_CONFIG.
"""

from __future__ import annotations

import argparse
import sys

import gin

from elm_jax.commands import flags
from elm_jax.training import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--dry_run", action="store_true",
                      help="print every expert's training plan (of the whole recipe, with an experiment "
                           "file) and the model and mesh, and exit, building no model (steps from the data's sizes where it is here: P3 stats files, continual files' line counts)")


def main(args: argparse.Namespace) -> int:
  if not gin.config_str():
    print("elm-jax train: error: pass a run file, e.g. --gin_file=gin_configs/runs/train_experts.gin",
          file=sys.stderr)
    return 2
  final = train_configured(progress=not args.no_progress, dry_run=args.dry_run)
  for name, metrics in final.items():
    print(f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
  return 0


def train_configured(**overrides):
  """`run.train` with the arguments the parsed gin files and bindings give it, and `overrides`
  (progress, dry_run, ...): {expert name: final metrics}. What `train` and
  `elm_jax.api.train_experts(gin_files=...)` run."""
  return gin.get_configurable(run.train)(**overrides)
