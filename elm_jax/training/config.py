"""What a training run trains (`TrainConfig`), and the settings no run can use (`check_settings`).

Its own module so that the trainer, its inputs and its checkpointing all read it without
importing each other.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Optional

from elm_jax import defaults
from elm_jax.checkpoints import expert_files
from elm_jax.training.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What to train: one expert per entry of `expert_tasks` (SeqIO task or mixture names)."""
  model_dir: str
  expert_tasks: tuple[str, ...]
  steps: int
  batch_size: int = 8
  input_length: int = defaults.TRAIN_INPUT_LENGTH
  target_length: int = defaults.TRAIN_TARGET_LENGTH
  expert_names: Optional[tuple[str, ...]] = None
  seed: int = defaults.SEED
  # Every expert's new modules start from the same draw (from `seed`), as in the paper's code,
  # where each expert is its own run with seed 42. Averaging experts (top-k merging, composed
  # instructions) relies on it; False draws each expert's from `seed + e` instead.
  shared_init: bool = True
  save_every: int = 100
  keep: int = 3
  log_every: int = 10
  split: str = "train"
  backbone_checkpoint: Optional[str] = None  # recorded in each expert's metadata
  # Background input threads (tf.data autotuning and prefetch). None: on, except on a CPU
  # backend, where they compete with XLA for the same cores (and delay shutdown by seconds).
  input_prefetch: Optional[bool] = None
  # Each expert's own plan inside the group (training.plans): its number of steps (`steps` is
  # then their maximum, the group's length) and its peak learning rate (default: the
  # optimizer's). An expert that has taken its steps stops changing while the others go on.
  expert_steps: Optional[tuple[int, ...]] = None
  expert_learning_rates: Optional[tuple[float, ...]] = None

  def steps_per_expert(self) -> tuple[int, ...]:
    return tuple(self.expert_steps) if self.expert_steps is not None else (self.steps,) * len(self.expert_tasks)

  def expert_seeds(self) -> tuple[int, ...]:
    """Each expert's seed for its input order and dropout masks: from `seed` and its name, so
    neither depends on which experts share its program (trained alone, it draws the same)."""
    return tuple((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 32) for name in self.names())

  def names(self) -> tuple[str, ...]:
    """The experts' names (default: their tasks), each with its own export directory: names
    that are empty, `.`/`..`, or that map to one directory name (`a/b`, `a_b`) are refused."""
    names = self.expert_names or self.expert_tasks
    field = "TrainConfig.expert_names" if self.expert_names else "TrainConfig.expert_tasks"
    if len(names) != len(self.expert_tasks):
      raise TrainingError(f"TrainConfig.expert_names: {len(names)} names for "
                          f"{len(self.expert_tasks)} expert_tasks")
    if not names:
      raise TrainingError("TrainConfig.expert_tasks: expected at least one task")
    if len(set(names)) != len(names):
      raise TrainingError(f"{field}: names must be unique, got {list(names)}")
    try:
      expert_files.directory_names(names, field)
    except expert_files.ExpertFileError as e:
      raise TrainingError(str(e)) from None
    return tuple(names)

  def expert_dir(self, name: str) -> str:
    """Where expert `name` is exported: `<model_dir>/experts/<directory name>`."""
    return os.path.join(self.model_dir, "experts", expert_files.directory_name(name))


def check_settings(config: TrainConfig) -> None:
  """Refuses settings no run can use, before any work: non-positive counts and lengths, and a
  MODEL_DIR that is a file."""
  for field in ("steps", "batch_size", "save_every", "keep", "log_every"):
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise TrainingError(f"TrainConfig.{field}: expected a positive integer, got {value!r}")
  for field in ("expert_steps", "expert_learning_rates"):
    values = getattr(config, field)
    if values is not None and len(values) != len(config.expert_tasks):
      raise TrainingError(f"TrainConfig.{field}: {len(values)} values for {len(config.expert_tasks)} experts")
  if config.expert_steps is not None:
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in config.expert_steps):
      raise TrainingError(f"TrainConfig.expert_steps: expected positive integers, got {list(config.expert_steps)}")
    if max(config.expert_steps) != config.steps:
      raise TrainingError(f"TrainConfig.steps: {config.steps}, but the longest expert plan has "
                          f"{max(config.expert_steps)} steps; the group runs exactly as long as that")
  if config.expert_learning_rates is not None and any(
      not isinstance(v, (int, float)) or not v > 0 for v in config.expert_learning_rates):
    raise TrainingError(f"TrainConfig.expert_learning_rates: expected positive numbers, got "
                        f"{list(config.expert_learning_rates)}")
  for field in ("input_length", "target_length"):
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
      raise TrainingError(f"TrainConfig.{field}: expected an integer of at least 2, got {value!r}")
  if os.path.lexists(config.model_dir) and not os.path.isdir(config.model_dir):
    raise TrainingError(f"MODEL_DIR={config.model_dir}: exists and is not a directory")
