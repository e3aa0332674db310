"""PHATGOOSE's second stage (Muqeeth et al. 2024): one gate vector per expert per routed module,
trained after the expert on the expert's own task, the expert and the backbone frozen.

At every module where an expert changes the output (`models/routing.py`: a LoRA or IA3 expert's
targeted projections, an adapter's sub-layers), the gated expert computes base +
sigmoid(<x, g>) delta(x), x the module's input, g that module's gate [in]; the loss is the
usual LM loss, and only the gates train. Gates start at 0 (sigmoid 0.5: half of the expert's
change everywhere) and train for `GATE_STEPS` steps with AdamW at `GATE_LEARNING_RATE`, decayed
linearly (microsoft/mttl's PHATGOOSE defaults: 100 steps, 1e-3), without dropout.

E experts' gates train in one compiled program, vmapped over experts as expert training is
(`train_step.train_step`, each expert on its own batch and its own schedule), on the trainer's
inputs (`inputs.expert_batches`: each expert's rows in the order its training read them, from
the run's seed and its name) with the trainer's Orbax checkpoints (`checkpointing.Checkpoints`
in `<model_dir>/checkpoints`), so a run killed at any step and started again ends with the gates
an uninterrupted run gives, bit for bit. `<model_dir>/gate_run.json` records what the run
trains; a MODEL_DIR holding another gate run is refused. With a partitioner the gates, their
optimizer state and the frozen experts split over the mesh's `expert` axis, each expert's batch
over `data` and the backbone by the model rules, as expert training splits them (each process
reads only its block of the batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec

from elm_jax import files, partitioning, tree_paths
from elm_jax.models import routing
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.training import checkpointing, inputs
from elm_jax.training import train_step as ts
from elm_jax.training.config import TrainConfig, check_settings
from elm_jax.training.errors import TrainingError

GATE_STEPS = 100
GATE_LEARNING_RATE = 1e-3
RUN_FILE = "gate_run.json"


def gate_optimizer(learning_rate: float = GATE_LEARNING_RATE) -> ts.OptimizerConfig:
  """AdamW at `learning_rate`, decayed linearly to 0, gradient norm clipped to 1 per expert."""
  return ts.OptimizerConfig(learning_rate=learning_rate)


@dataclasses.dataclass(frozen=True)
class GateModel:
  """What the train step asks of a model (`expert_losses`), for gates: `routed` is the experts'
  model built with `RoutedExperts.over(..., gate_training=True)`; each expert runs alone, its
  change at each routed module scaled by sigmoid(<x, its gate>)."""
  routed: EncoderDecoderModel

  @classmethod
  def of(cls, model: EncoderDecoderModel) -> "GateModel":
    """The gate model of `model` (built with the experts' configurations), without dropout."""
    return cls(EncoderDecoderModel.build(model.config.replace(dropout_rate=0.0),
                                         routing.RoutedExperts.over(model.expert, gate_training=True)))

  def expert_losses(self, frozen, gates, batch, dropout_rngs=None):
    """frozen {'backbone': the routed backbone, 'experts': leaves [E, ...]}, gates {module path:
    {'gates': [E, in]}}, batch leaves [E, batch, length] -> (losses [E], metrics, each [E])."""
    def one(expert, gate, expert_batch):
      rows = expert_batch["encoder_input_tokens"].shape[0]
      collections = {routing.EXPERTS: jax.tree_util.tree_map(lambda v: v[None], expert),
                     routing.ROUTING: {**jax.tree_util.tree_map(lambda v: v[None], gate),
                                       "example_weights": jnp.ones((rows, 1), jnp.float32),
                                       "valid": jnp.ones((1,), jnp.bool_)}}
      return self.routed.loss(frozen["backbone"], expert_batch, None, collections=collections)
    return jax.vmap(one)(frozen["experts"], gates, batch)


@functools.partial(jax.jit, static_argnames=("model", "optimizer_config"))
def gate_step(state: ts.ExpertTrainState, frozen, batch, plans: ts.ExpertSchedules, *, model: GateModel,
              optimizer_config: ts.OptimizerConfig):
  """One step of every expert's gates (`train_step.train_step` on the `GateModel`): state whose
  params are the gates [E, ...], the frozen backbone and experts, batch leaves [E, batch,
  length] -> (state, metrics [E] each)."""
  return ts.train_step(state, frozen, batch, model=model, optimizer=ts.make_optimizer(optimizer_config),
                       plans=plans)


def _step_function(gate_model: GateModel, model: EncoderDecoderModel, optimizer_config: ts.OptimizerConfig,
                   state: ts.ExpertTrainState, plans: ts.ExpertSchedules,
                   partitioner: Optional[partitioning.Partitioner]):
  """(the compiled gate step `(state, frozen, batch, plans) -> (state, metrics)`, the logical
  specs of those four inputs, or None without a partitioner)."""
  if partitioner is None:
    return functools.partial(gate_step, model=gate_model, optimizer_config=optimizer_config), None
  optimizer = ts.make_optimizer(optimizer_config)

  def step(state, frozen, batch, plans):
    return ts.train_step(state, frozen, batch, model=gate_model, optimizer=optimizer, plans=plans)
  gate_specs = jax.tree_util.tree_map(lambda _: PartitionSpec("expert", None), state.params)
  state_specs = ts.state_specs(gate_specs, state.opt_state)
  frozen_specs = {"backbone": gate_model.routed.param_specs(), "experts": model.expert_specs()[1]}
  batch_specs = {k: PartitionSpec("expert", "batch", "length") for k in inputs.FEATURES}
  plan_specs = jax.tree_util.tree_map(lambda _: PartitionSpec("expert"), plans)
  specs = (state_specs, frozen_specs, batch_specs, plan_specs)
  return partitioner.partition(step, specs, (state_specs, PartitionSpec("expert"))), specs


def initial_gates(model: EncoderDecoderModel, backbone, stacked) -> dict:
  """Zero gates for every routed module of the E experts of `stacked` (leaves [E, ...]):
  {module path: {'gates': [E, in] float32}}."""
  num = int(jax.tree_util.tree_leaves(stacked)[0].shape[0])
  sites = routing.gate_sites(model, backbone, stacked)
  if not sites:
    raise TrainingError("gate training: the experts change no routed module (nothing to put a gate on)")
  return tree_paths.unflatten({key + ("gates",): np.zeros((num, dim), np.float32) for key, dim in sites.items()})


def expert_gates(gates, e: int) -> dict[str, np.ndarray]:
  """Expert e's gates from the stacked gates tree: {site key joined by '/': [in] float32}."""
  return {tree_paths.join(path[:-1]): np.asarray(value[e], np.float32)
          for path, value in tree_paths.flatten(gates).items()}


def train_gates(config: TrainConfig, model: EncoderDecoderModel, backbone, stacked, *,
                optimizer_config: Optional[ts.OptimizerConfig] = None,
                on_step: Optional[Callable[[int], None]] = None,
                partitioner: Optional[partitioning.Partitioner] = None) -> tuple[list[dict[str, np.ndarray]], dict]:
  """Trains the gates of the E experts of `stacked` (leaves [E, ...], of `model`'s
  configurations, over the frozen `backbone`) for `config.steps` steps, expert e on
  `config.expert_tasks[e]` (its name `config.names()[e]`), checkpointing in
  `<config.model_dir>/checkpoints` every `config.save_every` steps and resuming from there.
  Returns (each expert's gates {site key: [in] float32}, the metrics of the last step per
  expert name, {} when the run had finished before). `on_step(step)` is called after each step.
  With a `partitioner`, the run is split over its mesh (module docstring); E must be a multiple
  of the mesh's `expert` axis."""
  names = config.names()
  check_settings(config)
  if len(names) != int(jax.tree_util.tree_leaves(stacked)[0].shape[0]):
    raise TrainingError(f"gate training: {len(names)} tasks for {jax.tree_util.tree_leaves(stacked)[0].shape[0]} "
                        "experts")
  if partitioner is not None and len(names) % partitioner.mesh.shape["expert"]:
    raise TrainingError(f"gate training: {len(names)} experts cannot be split over the mesh's expert axis of "
                        f"{partitioner.mesh.shape['expert']}; choose a mesh whose expert axis divides the number "
                        "of experts (--mesh=data:D,expert:E,model:M)")
  optimizer_config = optimizer_config or gate_optimizer()
  os.makedirs(config.model_dir, exist_ok=True)
  lock = checkpointing.hold_run_lock(config.model_dir) if files.is_local(config.model_dir) else contextlib.nullcontext()
  with lock:
    _check_run(config, optimizer_config)
    gate_model = GateModel.of(model)
    frozen = {"backbone": routing.routed_backbone(gate_model.routed, backbone, stacked), "experts": stacked}
    optimizer = ts.make_optimizer(optimizer_config)
    state = ts.init_train_state(initial_gates(model, backbone, stacked), optimizer)
    checkpoints = checkpointing.Checkpoints(os.path.join(config.model_dir, "checkpoints"), config.keep)
    restored = checkpoints.restore_latest(state)
    state = restored if restored is not None else state
    start = int(state.step)
    plans = ts.ExpertSchedules.from_config(optimizer_config, config.steps_per_expert(), seeds=config.expert_seeds())
    step_fn, specs = _step_function(gate_model, model, optimizer_config, state, plans, partitioner)
    experts_here, rows_here, batch_sharding = slice(0, len(names)), slice(0, config.batch_size), None
    if specs is None:
      state = jax.device_put(state)  # as the step returns it: one program
    else:
      state_specs, frozen_specs, batch_specs, plan_specs = specs
      state, frozen, plans = (partitioner.place(state, state_specs), partitioner.place(frozen, frozen_specs),
                              partitioner.place(plans, plan_specs))
      batch_sharding = partitioner.sharding(batch_specs["encoder_input_tokens"])
      experts_here, rows_here, _ = partitioning.local_block(
          batch_sharding, (len(names), config.batch_size, config.input_length))
    batches = (inputs.expert_batches(config, model.config.vocab_size, experts=experts_here, rows=rows_here,
                                     start_step=start) if start < config.steps else None)
    logs = checkpointing.Logs(config.model_dir, names) if start < config.steps and partitioning.is_primary() else None
    metrics: dict[str, np.ndarray] = {}
    meter = {"tokens": 0.0, "clock": time.perf_counter()}
    try:
      for step in range(start, config.steps):
        before = state
        batch = next(batches)
        if batch_sharding is not None:  # the global batch, from every process's block
          batch = {k: partitioning.global_array(batch_sharding, (len(names), config.batch_size) + v.shape[2:], v)
                   for k, v in batch.items()}
        state, step_metrics = step_fn(state, frozen, batch, plans)
        metrics = partitioning.to_host(step_metrics)
        bad = np.where(~np.isfinite(metrics["loss"]))[0]
        if len(bad):
          checkpoints.save(before)
          raise TrainingError(f"gates of expert {names[bad[0]]!r} have a non-finite loss at step {step + 1}; saved "
                              f"the last good state (step {step}) in {config.model_dir}/checkpoints")
        done = step + 1
        meter["tokens"] += float(np.sum(metrics["tokens"]))
        if logs is not None and (done % config.log_every == 0 or done == config.steps):
          logs.write(done, metrics, meter["tokens"] / max(time.perf_counter() - meter["clock"], 1e-9))
          meter.update(tokens=0.0, clock=time.perf_counter())
        if done % config.save_every == 0 or done == config.steps:
          checkpoints.save(state)
        if on_step is not None:
          on_step(done)
    finally:
      if logs is not None:
        logs.close()
  host = partitioning.to_host(state.params)
  final = {n: {k: float(v[e]) for k, v in metrics.items()} for e, n in enumerate(names)} if metrics else {}
  return [expert_gates(host, e) for e in range(len(names))], final


def _check_run(config: TrainConfig, optimizer_config: ts.OptimizerConfig) -> None:
  """Records what this gate run trains in `<model_dir>/gate_run.json`, or refuses a MODEL_DIR
  whose record says it trains other gates (its checkpoints would be restored into this run)."""
  record = {"experts": list(config.names()), "tasks": list(config.expert_tasks), "steps": config.steps,
            "batch_size": config.batch_size, "input_length": config.input_length,
            "target_length": config.target_length, "seed": config.seed,
            "optimizer": dataclasses.asdict(optimizer_config)}
  path = os.path.join(config.model_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      try:
        recorded = json.load(f)
      except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not valid JSON ({e}); use another MODEL_DIR") from None
    if recorded != json.loads(json.dumps(record)):
      differ = sorted(k for k in record if recorded.get(k) != json.loads(json.dumps(record[k])))
      raise TrainingError(f"{path}: this MODEL_DIR holds a gate run of other settings ({', '.join(differ)} "
                          "differ); its checkpoints cannot be resumed by this run: use another MODEL_DIR")
    return
  files.write_atomically(path, json.dumps(record, indent=1, sort_keys=True).encode())
