"""`elm-jax plan`: will a training recipe fit a pod? Lowered and measured on this machine.

    elm-jax plan --gin_file=experiments/elm_prompt_experts_xl.gin --devices=32 --accelerator=tpu_v4

Reads the same gin files as `elm-jax train`, builds the run's train step (each distinct shape of
the recipe with --all_shapes) and the one-pass scorer for a mesh of --devices fake CPU devices
(`partitioning.MeshConfig` from the gin files), compiles them on abstract arrays (no weights are
loaded or allocated), and prints per device: parameters, optimizer state, batch, activations
saved for the backward pass, XLA's memory analysis, FLOPs per step and the step time the peak
FLOP/s implies. Exits with status 2, naming what to change (rematerialization, more expert
shards, a smaller group, a smaller scoring chunk), when a program does not fit the chip.
"""

from __future__ import annotations

import argparse
import sys

import gin
import jax

from elm_jax import planning
from elm_jax.commands import flags
from elm_jax.training import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--devices", type=flags.plan_devices, required=True,
                      help="devices of the pod slice or host to plan for (e.g. 32 for a TPU v4-64, "
                           f"8 for an 8-GPU host); simulated as fake CPU devices, at most "
                           f"{flags.MAX_PLAN_DEVICES}")
  parser.add_argument("--accelerator", choices=sorted(planning.ACCELERATORS), default="tpu_v4",
                      help="chip preset: memory per device and peak FLOP/s (default tpu_v4)")
  parser.add_argument("--memory_gib", type=flags.finite_float, default=None,
                      help="memory per device in GiB, instead of the preset's")
  parser.add_argument("--peak_tflops", type=flags.finite_float, default=None,
                      help="peak TFLOP/s per device for the step-time figure, instead of the preset's")
  parser.add_argument("--all_shapes", action="store_true",
                      help="plan every distinct train-step shape of the whole recipe, not only GROUP's")
  parser.add_argument("--no_scoring", action="store_true", help="plan the train step only")
  parser.add_argument("--score_experts", type=flags.positive_int, default=None,
                      help="experts scored in one pass (default: every expert of the recipe)")
  parser.add_argument("--score_batch_size", type=flags.positive_int, default=32)
  parser.add_argument("--score_choices", type=flags.positive_int, default=4,
                      help="answer choices per example in the scoring pass (default 4)")


def use_devices(count: int) -> None:
  """Makes this process's JAX backend `count` CPU devices (before it first starts)."""
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend has started already (a second plan in one process): see below
    pass
  have = jax.device_count()
  if have != count or jax.devices()[0].platform != "cpu":
    raise planning.PlanError(f"--devices={count}: this process's JAX backend already started with "
                             f"{have} {jax.devices()[0].platform} devices; run `elm-jax plan` in a "
                             "process of its own")


def main(args: argparse.Namespace) -> int:
  if not gin.config_str():
    print("elm-jax plan: error: pass the run's gin files, e.g. "
          "--gin_file=experiments/elm_prompt_experts_xl.gin", file=sys.stderr)
    return 2
  use_devices(args.devices)
  memory = None if args.memory_gib is None else int(args.memory_gib * planning.GiB)
  if memory is not None and memory <= 0:
    raise planning.PlanError(f"--memory_gib: expected a positive size, got {args.memory_gib}")
  request = planning.PlanRequest(
      accelerator=planning.ACCELERATORS[args.accelerator], memory_bytes=memory,
      peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12, score=not args.no_scoring,
      score_experts=args.score_experts, score_batch_size=args.score_batch_size,
      score_choices=args.score_choices)
  refused = []

  def plan(layout: run.RunLayout) -> None:
    try:
      planning.plan_run(layout, request)
    except planning.PlanError as e:  # raised here, not through gin, which appends its own context
      refused.append(e)
  # The run files require MODEL_DIR; a plan reads and writes nothing there.
  gin.get_configurable(run.train)(model_dir="", plan=plan, all_shapes=args.all_shapes)
  if refused:
    raise refused[0]
  return 0
