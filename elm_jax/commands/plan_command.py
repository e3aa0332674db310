"""`elm-jax plan`: will a training recipe fit a pod? Lowered and measured on this machine.

    elm-jax plan --gin_file=experiments/elm_prompt_experts_xl.gin --devices=32 --accelerator=tpu_v4

Reads the same gin files as `elm-jax train`, builds the run's train step (each distinct shape of
the recipe with --all_shapes) and the one-pass scorer for a mesh of --devices fake CPU devices
(`partitioning.MeshConfig` from the gin files), compiles them on abstract arrays (no weights are
loaded or allocated), and prints per device: parameters, optimizer state, batch, activations
saved for the backward pass, XLA's memory analysis, FLOPs per step and the step time the peak
FLOP/s implies. Exits with status 2, naming what to change (rematerialization, more expert
shards, a smaller group, a smaller scoring chunk), when a program does not fit the chip.

The sweep (no training recipe needed): what `eval` costs for a library of --sweep_experts
experts on a task or mixture, from its registry (--sweep_task=NAME --setup=...), from counts
given for data not on this machine (--sweep_counts=NAME:EXAMPLES:CHOICES,... or a .json file),
or the paper's full evaluation (--sweep=paper): the units, the scores, the mesh and expert chunk
`eval` would choose, the scorer's per-device memory, FLOPs and the time at peak
(`elm_jax/planning_sweep.py`).

    elm-jax plan --sweep=paper --gin_file=models/t5_1_1_xl.gin --devices=32 --accelerator=tpu_v4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import gin
import jax

from elm_jax import defaults, planning
from elm_jax.commands import flags, gin_utils, run_files
from elm_jax.models.adapters import ExpertConfig
from elm_jax.training import run

# The backbone `--sweep=paper` plans when no model gin file is given: the paper's T5-XL LM-adapt.
PAPER_MODEL_GIN = "models/t5_1_1_xl.gin"


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
  parser.add_argument("--score_input_length", type=flags.token_length, default=defaults.MAX_INPUT_LENGTH,
                      help=f"input tokens of a scoring batch (default {defaults.MAX_INPUT_LENGTH}, eval's)")
  parser.add_argument("--score_target_length", type=flags.token_length, default=defaults.MAX_TARGET_LENGTH,
                      help=f"answer-choice tokens of a scoring batch (default {defaults.MAX_TARGET_LENGTH}, eval's)")
  group = parser.add_argument_group("the sweep: what `eval` costs for a library on a task or mixture (no "
                                    "training recipe needed; the mesh from partitioning.MeshConfig bindings, "
                                    "the expert chunk from --score_experts, else as eval chooses them)")
  group.add_argument("--sweep", choices=["paper"], default=None,
                     help="paper: 296 experts on the 113 held-out prompts at their validation sizes and "
                          "BIG-bench 13 (T5-XL unless a model gin file is given)")
  group.add_argument("--sweep_task", default=None, help="a registered task or mixture (see --setup), counted "
                                                        "from its data")
  group.add_argument("--setup", default=None, help="tasks to register: builtin, elm, module:function")
  group.add_argument("--sweep_split", default="validation")
  group.add_argument("--sweep_max_examples", type=flags.positive_int_or_all, default=defaults.MAX_EXAMPLES,
                     help=f"per task, or 'all' (default {defaults.MAX_EXAMPLES}, eval's)")
  group.add_argument("--sweep_counts", default=None,
                     help="NAME:EXAMPLES:CHOICES[,...] or a .json file {NAME: {examples, choices}}: tasks "
                          "whose data is not here (beside --sweep or --sweep_task: added, or in place of "
                          "the task of that name)")
  group.add_argument("--sweep_experts", type=flags.positive_int, default=None,
                     help="experts in the library (--sweep=paper: 296)")
  group.add_argument("--unit_experts", type=flags.positive_int, default=None,
                     help="experts per sweep unit, as eval's flag (default: all, one unit per task)")


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
  if args.sweep or args.sweep_task or args.sweep_counts:
    return plan_sweep(args)
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
      score_choices=args.score_choices, score_input_length=args.score_input_length,
      score_target_length=args.score_target_length)
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


def plan_sweep(args: argparse.Namespace) -> int:
  """The sweep's plan: flags checked (and counts read) before the devices start."""
  from elm_jax import planning_sweep  # lazy: plans of a training recipe do not need it
  if args.all_shapes or args.no_scoring:
    raise planning.PlanError("--all_shapes and --no_scoring plan a training recipe; the sweep plans the "
                             "scorer only")
  if args.sweep_task and args.sweep:
    raise planning.PlanError("--sweep and --sweep_task: plan the paper's sweep or a registered task, not both")
  counts = planning_sweep.parse_counts(args.sweep_counts) if args.sweep_counts else []
  experts = args.sweep_experts or (planning_sweep.PAPER_EXPERTS if args.sweep == "paper" else None)
  if experts is None:
    raise planning.PlanError("--sweep_experts: expected the number of experts in the library (e.g. "
                             "--sweep_experts=296)")
  if gin_utils.model_config_or_none() is None:
    if args.sweep != "paper":
      raise planning.PlanError("no MODEL_CONFIG is bound: pass a model gin file, e.g. "
                               f"--gin_file={PAPER_MODEL_GIN}")
    gin.parse_config_file(f"{gin_utils.GIN_CONFIGS_DIR}/{PAPER_MODEL_GIN}")
    print(f"note: no model gin file given: planning the paper's backbone, {PAPER_MODEL_GIN}")
  model_config = gin_utils.model_config_from_gin()
  memory = None if args.memory_gib is None else int(args.memory_gib * planning.GiB)
  if memory is not None and memory <= 0:
    raise planning.PlanError(f"--memory_gib: expected a positive size, got {args.memory_gib}")
  chip = planning.ACCELERATORS[args.accelerator]
  if memory is not None:
    chip = dataclasses.replace(chip, name=f"{chip.name}-like chip", memory_bytes=memory)
  use_devices(args.devices)
  shapes = dict(batch_size=args.score_batch_size, input_length=args.score_input_length,
                target_length=args.score_target_length, unit_experts=args.unit_experts)
  if args.sweep == "paper":
    spec = planning_sweep.paper_sweep(**shapes, num_experts=experts)
  else:
    tasks = []
    if args.sweep_task:
      from tasks import instances  # lazy: registering tasks imports SeqIO
      instances.register_setup(args.setup)
      instances.ensure_registered([args.sweep_task])
      tasks = planning_sweep.registry_tasks([args.sweep_task], args.sweep_split, args.sweep_max_examples)
    title = args.sweep_task or "the counts given"
    spec = planning_sweep.SweepSpec(f"{experts} experts on {title}", tuple(tasks), experts, **shapes)
  spec = planning_sweep.with_counts(spec, counts)
  planning_sweep.plan_sweep(spec, model_config, expert_config_from_gin(), chip,
                            peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12,
                            mesh_config=run_files.mesh_config_from_gin(), expert_chunk=args.score_experts)
  return 0


def expert_config_from_gin() -> ExpertConfig:
  """The experts' config: gin's bindings of `adapters.ExpertConfig` fields (a run file such as
  runs/train_experts.gin, or --gin.adapters.ExpertConfig.kind=...), the rest ExpertConfig's
  defaults: the paper's adapters (reduction factor 32, layer norms trained)."""
  bound = {}
  for field in dataclasses.fields(ExpertConfig):
    try:
      bound[field.name] = gin.query_parameter(f"adapters.ExpertConfig.{field.name}")
    except ValueError:
      continue
  return ExpertConfig(**bound)
