"""What a training run keeps on disk: Orbax checkpoints of the expert stack and optimizer state
(restored past a damaged step), the training log (JSON lines and TensorBoard scalars per
expert), and the exported experts (`checkpoints.expert_files`, one directory per expert).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import orbax.checkpoint as ocp

from elm_jax import expert_stack, partitioning, tf_input
from elm_jax.checkpoints import expert_files
from elm_jax.training import train_step as ts

if TYPE_CHECKING:
  from elm_jax.training.trainer import TrainConfig


class Checkpoints:
  """Orbax CheckpointManager of {step, params, opt_state}, with fallback past a damaged step."""

  def __init__(self, directory: str, keep: int):
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))

  def save(self, state: ts.ExpertTrainState) -> None:
    step = int(state.step)
    if step not in self.manager.all_steps():
      self.manager.save(step, args=self._ocp.args.StandardSave(dataclasses.asdict(state)))
      self.manager.wait_until_finished()

  def restore_latest(self, template: ts.ExpertTrainState) -> Optional[ts.ExpertTrainState]:
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
            step, args=self._ocp.args.StandardRestore(dataclasses.asdict(template)))
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        logging.warning("checkpoint at step %d is unreadable (%s: %s); trying an earlier one",
                        step, type(e).__name__, e)
        print(f"warning: checkpoint at step {step} is unreadable ({type(e).__name__}); "
              "falling back to an earlier one", file=sys.stderr)
        continue
      return ts.ExpertTrainState(**partitioning.to_host(restored))  # host arrays: placed by the caller
    return None


class Logs:
  """JSON lines in <model_dir>/train_log.jsonl and TensorBoard scalars per expert."""

  def __init__(self, model_dir: str, names: Sequence[str]):
    tf = tf_input.tensorflow()
    self.names = names
    self.json_path = os.path.join(model_dir, "train_log.jsonl")
    self.writers = {n: tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", n))
                    for n in names}
    self.tf = tf

  def write(self, step: int, metrics: dict[str, np.ndarray], tokens_per_second: float) -> None:
    record = {"step": step, "tokens_per_second": tokens_per_second, "experts": {}}
    for e, name in enumerate(self.names):
      values = {k: float(v[e]) for k, v in metrics.items()}
      record["experts"][name] = values
      with self.writers[name].as_default():
        for key, value in values.items():
          self.tf.summary.scalar(key, value, step=step)
    with open(self.json_path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    for writer in self.writers.values():
      writer.close()


def exported_metrics(config: "TrainConfig", names) -> Optional[dict[str, dict[str, float]]]:
  """Each expert's recorded final metrics, if all were exported after their planned steps."""
  out = {}
  for name, steps in zip(names, config.steps_per_expert()):
    directory = config.expert_dir(name)
    try:
      meta = expert_files.load_metadata(directory)
    except expert_files.ExpertFileError:
      return None
    if meta.steps != steps or not os.path.isfile(os.path.join(directory, expert_files.TENSORS_FILE)):
      return None
    out[name] = dict(meta.metrics)
  return out


def export(config: "TrainConfig", names, model_config, expert_config, optimizer_config,
            fingerprint: str, state, metrics) -> None:
  """Writes each expert with its own step count, plan and the metrics of its last step (`state`
  on the host). With several processes, process 0 writes and the others wait for it."""
  if not partitioning.is_primary():
    partitioning.barrier("elm_jax.export")
    return
  expert_steps = np.asarray(state.expert_steps)
  rates = config.expert_learning_rates or (optimizer_config.learning_rate,) * len(names)
  for e, name in enumerate(names):
    meta = expert_files.ExpertMetadata(
        name=name, task=config.expert_tasks[e], expert_config=dataclasses.asdict(expert_config),
        backbone_fingerprint=fingerprint,
        training_config={**dataclasses.asdict(config), "optimizer": dataclasses.asdict(optimizer_config),
                         "model": dataclasses.asdict(model_config),
                         "plan": {"steps": int(expert_steps[e]), "learning_rate": float(rates[e])}},
        steps=int(expert_steps[e]), metrics={k: float(v[e]) for k, v in metrics.items()})
    expert_files.save_expert(config.expert_dir(name), expert_stack.index(state.params, e), meta, overwrite=True)
  partitioning.barrier("elm_jax.export")
