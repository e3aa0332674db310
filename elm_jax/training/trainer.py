"""The one training loop: one expert, hundreds in groups, a dataset expert on a mixture, or the
multitask baseline, over a frozen backbone, with preemption-safe checkpoints.

Each expert draws its batches from its own SeqIO task or mixture (`inputs`); one compiled step
updates all of them (`train_step.train_step`). Orbax keeps the last `keep` checkpoints
(`checkpointing`); the input position follows from the step (`tasks.row_order`), so a run
killed at any moment and restarted ends with the same parameters as one never interrupted. A
non-finite loss stops the run, naming the expert and the step, after saving the last good state. Each expert is exported to `<model_dir>/experts/<name>/`.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec
from tqdm import tqdm

from elm_jax import partitioning
from elm_jax.checkpoints import expert_files
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config
from elm_jax.training import checkpointing, inputs
from elm_jax.training.config import TrainConfig, check_settings
from elm_jax.training import train_step as ts
from elm_jax.training.errors import TrainingError

__all__ = ["TrainConfig", "TrainingError", "check_settings", "initial_experts", "train_experts"]


class _Ahead(threading.Thread):
  """Runs `fn()` on a background thread; `result()` waits, then returns its value or raises
  what it raised."""

  def __init__(self, fn: Callable[[], Any]):
    super().__init__(daemon=True, name="elm-jax-input-ahead")
    self._fn, self._value, self._error = fn, None, None
    self.start()

  def run(self) -> None:
    try:
      self._value = self._fn()
    except BaseException as e:  # re-raised in the caller's thread
      self._error = e

  def result(self) -> Any:
    self.join()
    if self._error is not None:
      raise self._error
    return self._value


def initial_experts(model_config: T5Config, expert_config: ExpertConfig, backbone_params: dict,
                    num_experts: int, seed: int, shared_init: bool = True) -> tuple[dict, dict]:
  """(frozen backbone, stacked expert parameters [E, ...]) over the pretrained `backbone_params`:
  `EncoderDecoderModel.init_experts` of the model of `model_config` with `expert_config`."""
  return EncoderDecoderModel.build(model_config, expert_config).init_experts(
      backbone_params, num_experts, seed, shared_init=shared_init)


def step_function(model: EncoderDecoderModel, optimizer, dropout_rng: Optional[jax.Array],
                  state: ts.ExpertTrainState, plans: ts.ExpertSchedules,
                  partitioner: Optional[partitioning.Partitioner] = None):
  """(the compiled train step `(state, backbone, batch, plans) -> (state, metrics)`, the logical
  specs of those four inputs, or None without a partitioner). `state` and `plans` may be
  abstract (`jax.eval_shape`): only their structure is read. `elm-jax plan` lowers this same
  step."""
  def step(state, backbone, batch, plans):
    return ts.train_step(state, backbone, batch, model=model, optimizer=optimizer,
                         dropout_rng=dropout_rng, plans=plans)
  if partitioner is None:
    return jax.jit(step), None
  backbone_specs, expert_specs = model.expert_specs()
  state_specs = ts.state_specs(expert_specs, state.opt_state)
  plan_specs = jax.tree_util.tree_map(lambda _: PartitionSpec("expert"), plans)
  batch_specs = {k: PartitionSpec("expert", "batch", "length") for k in inputs.FEATURES}
  specs = (state_specs, backbone_specs, batch_specs, plan_specs)
  return partitioner.partition(step, specs, (state_specs, PartitionSpec("expert"))), specs


def train_experts(config: TrainConfig, model_config: T5Config, backbone_params: dict, *,
                  expert_config: ExpertConfig = ExpertConfig(),
                  optimizer_config: ts.OptimizerConfig = ts.OptimizerConfig(),
                  on_step: Optional[Callable[[int], None]] = None,
                  progress: bool = True,
                  partitioner: Optional[partitioning.Partitioner] = None,
                  backbone_fingerprint: Optional[str] = None) -> dict[str, dict[str, float]]:
  """Trains `len(config.expert_tasks)` experts together; returns final metrics per expert.

  With a `partitioner`, stacked experts and their optimizer state are split over the mesh's
  `expert` axis, batches over (`expert`, `data`), and the backbone by the model rules.
  `backbone_fingerprint` (default: that of `backbone_params`) is recorded in every expert: an
  upcycled model records the dense checkpoint it came from.
  """
  names = config.names()
  check_settings(config)
  os.makedirs(config.model_dir, exist_ok=True)
  block = _LocalBlock.of(config, len(names), partitioner)
  checkpoints = checkpointing.Checkpoints(os.path.join(config.model_dir, "checkpoints"), config.keep)
  latest = max(checkpoints.manager.all_steps(), default=0)
  stream = block.batches(config, model_config.vocab_size, latest)  # tasks checked
  # The input pipelines (Python and TensorFlow) build on another thread while this one
  # initialises the experts and compiles the step (XLA, which releases the GIL).
  first = _Ahead(lambda: next(stream)) if latest < config.steps else None
  model = EncoderDecoderModel.build(model_config, expert_config)
  backbone, state, plans, optimizer = _initial_state(config, model, optimizer_config, backbone_params, checkpoints)
  start = int(state.step)
  step_fn, state, backbone, plans = _compiled_step(config, model, optimizer, state, backbone, plans, start,
                                                   partitioner)
  if first is not None:
    stream = itertools.chain([first.result()], stream)
  if start != latest:  # the latest checkpoint was not the one restored: read from its step
    stream = block.batches(config, model_config.vocab_size, start)
  monitor = _Monitor(config, names, checkpoints, start, progress)
  state, metrics = _train_loop(config, step_fn, state, backbone, plans, start,
                               (block.global_batch(b) for b in stream), monitor, on_step)
  if not metrics:
    # Restored at the last step (a finished run started again): its experts were exported
    # with their final metrics; keep them rather than overwrite them with none.
    exported = checkpointing.exported_metrics(config, names)
    if exported is not None:
      return exported
  fingerprint = backbone_fingerprint or expert_files.backbone_fingerprint(backbone_params)
  checkpointing.export(config, names, model_config, expert_config, optimizer_config, fingerprint,
                       partitioning.to_host(state), metrics)
  return {n: {k: float(v[i]) for k, v in metrics.items()} for i, n in enumerate(names)} if metrics else {}


class _LocalBlock:
  """The experts and batch rows this process reads, and how its block joins the global batch:
  with a partitioner, each process reads only the experts (and rows) its devices hold and the
  global batch [E, batch, ...] is assembled from every process's block; without one (or with
  one process), the whole batch."""

  def __init__(self, config: TrainConfig, num_experts: int, sharding, experts: slice, rows: slice):
    self.num_experts, self.batch_size = num_experts, config.batch_size
    self.sharding, self.experts, self.rows = sharding, experts, rows

  @classmethod
  def of(cls, config: TrainConfig, num_experts: int,
         partitioner: Optional[partitioning.Partitioner]) -> "_LocalBlock":
    if partitioner is None:
      return cls(config, num_experts, None, slice(0, num_experts), slice(0, config.batch_size))
    sharding = partitioner.sharding(PartitionSpec("expert", "batch", "length"))
    experts, rows, _ = partitioning.local_block(sharding, (num_experts, config.batch_size, config.input_length))
    return cls(config, num_experts, sharding, experts, rows)

  def batches(self, config: TrainConfig, vocab_size: int, start_step: int):
    """This process's block of each step's batch, from `start_step` on (`inputs.expert_batches`)."""
    return inputs.expert_batches(config, vocab_size, experts=self.experts, rows=self.rows, start_step=start_step)

  def global_batch(self, local: dict[str, np.ndarray]):
    """The step's global batch, features [E, batch, length], from this process's block."""
    if self.sharding is None:
      return local
    return {k: partitioning.global_array(self.sharding, (self.num_experts, self.batch_size) + v.shape[2:], v)
            for k, v in local.items()}


def _initial_state(config: TrainConfig, model: EncoderDecoderModel, optimizer_config: ts.OptimizerConfig,
                   backbone_params: dict, checkpoints: checkpointing.Checkpoints):
  """(frozen backbone, train state of the stacked experts [E, ...] restored from the latest
  checkpoint when there is one, each expert's schedule, the optimizer)."""
  backbone, stacked = model.init_experts(backbone_params, len(config.expert_tasks), config.seed,
                                         shared_init=config.shared_init)
  optimizer = ts.make_optimizer(optimizer_config)  # rate 1: each expert's plan scales its update
  plans = ts.ExpertSchedules.from_config(optimizer_config, config.steps_per_expert(),
                                         config.expert_learning_rates, config.expert_seeds())
  state = ts.init_train_state(stacked, optimizer)
  restored = checkpoints.restore_latest(state)
  return backbone, (state if restored is None else restored), plans, optimizer


def _compiled_step(config: TrainConfig, model: EncoderDecoderModel, optimizer, state: ts.ExpertTrainState,
                   backbone, plans: ts.ExpertSchedules, start: int,
                   partitioner: Optional[partitioning.Partitioner]):
  """(the train step `step_function` builds, and the state, backbone and schedules placed on the
  mesh for it); the step is compiled ahead of time when steps remain after `start`."""
  noisy = model.config.dropout_rate > 0 or (model.config.moe is not None and model.config.moe.router_jitter > 0)
  # Dropout masks come from each expert's seed and own step count: resumable, and the same
  # whether an expert trains alone or in a group.
  rng = jax.random.PRNGKey(config.seed) if noisy else None
  step_fn, specs = step_function(model, optimizer, rng, state, plans, partitioner)
  if specs is not None:
    state_specs, backbone_specs, _, plan_specs = specs
    state = partitioner.place(state, state_specs)
    plans = partitioner.place(plans, plan_specs)
    backbone = partitioner.place(backbone, backbone_specs)
  if start < config.steps:
    try:
      step_fn.lower(state, backbone, inputs.batch_shapes(config), plans).compile()  # the first step finds it
    except Exception as e:  # the first step compiles again and reports it
      logging.info("ahead-of-time compilation failed (%s: %s)", type(e).__name__, e)
  return step_fn, state, backbone, plans


class _Monitor:
  """Checks each step's metrics (a non-finite loss saves the last good state and stops the run)
  and reports them every `log_every` steps: the metrics files and the progress bar (process 0)."""

  def __init__(self, config: TrainConfig, names: Sequence[str], checkpoints: checkpointing.Checkpoints,
               start: int, progress: bool):
    self.config, self.names, self.checkpoints = config, names, checkpoints
    primary = partitioning.is_primary()
    self.logs = checkpointing.Logs(config.model_dir, names) if primary else None
    self.bar = _progress_bar(start, config.steps, names) if progress and primary else None
    self.tokens, self.clock = 0.0, time.perf_counter()

  def check(self, done: int, step_metrics, before: ts.ExpertTrainState) -> dict[str, np.ndarray]:
    """The metrics of step `done` on the host ({name: [E]}); `before`: the state the step began from."""
    config, names = self.config, self.names
    values = partitioning.to_host(step_metrics)
    bad = np.where(~np.isfinite(values["loss"]))[0]
    if len(bad):
      self.checkpoints.save(before)
      raise TrainingError(f"expert {names[bad[0]]!r} ({config.expert_tasks[bad[0]]}) has a non-finite "
                          f"loss at step {done}; saved the last good state (step {int(before.step)}) "
                          f"in {config.model_dir}/checkpoints")
    self.tokens += float(values["tokens"].sum())
    if done % config.log_every == 0 or done == config.steps:
      rate = self.tokens / max(time.perf_counter() - self.clock, 1e-9)
      if self.logs is not None:
        self.logs.write(done, values, rate)
      if self.bar is not None:
        self.bar.set_postfix_str(" ".join(f"{n[:16]}={values['loss'][i]:.3f}" for i, n in
                                          enumerate(names[:4])) + f" tok/s={rate:.0f}")
      self.tokens, self.clock = 0.0, time.perf_counter()
    return values

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.logs is not None:
      self.logs.close()


def _train_loop(config: TrainConfig, step_fn, state: ts.ExpertTrainState, backbone, plans: ts.ExpertSchedules,
                start: int, batches, monitor: _Monitor, on_step: Optional[Callable[[int], None]]):
  """Runs the steps from `start` (the state's step) to `config.steps`, saving a checkpoint every `save_every`
  steps and at the end: (final state, the last checked metrics {name: [E]}, empty when no step
  ran)."""
  # Metrics of step s are read back while step s+1 runs (one step of lag), so the host never
  # waits on the device between steps; `pending` keeps the state from before the unchecked step.
  metrics: dict[str, np.ndarray] = {}
  pending = None
  for step in range(start, config.steps):
    before = state
    state, step_metrics = step_fn(state, backbone, next(batches), plans)
    if pending is not None:
      metrics = monitor.check(*pending)
    done = step + 1
    pending = (done, step_metrics, before)
    if done % config.save_every == 0 or done == config.steps:
      metrics = monitor.check(*pending)  # never checkpoint an unchecked state
      pending = None
      monitor.checkpoints.save(state)
    if monitor.bar is not None:
      monitor.bar.update(1)
    if on_step is not None:
      on_step(done)
  if pending is not None:
    metrics = monitor.check(*pending)
  monitor.close()
  return state, metrics


def _progress_bar(start: int, total: int, names: Sequence[str]):
  return tqdm(total=total, initial=start, desc=f"training {len(names)} expert(s)", file=sys.stderr,
              dynamic_ncols=True)


