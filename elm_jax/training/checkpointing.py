"""What a training run keeps on disk: Orbax checkpoints of the expert stack and optimizer state
(restored past a damaged step), the training log (JSON lines and TensorBoard scalars per
expert), the exported experts (`checkpoints.expert_files`, one directory per expert), and the
lock that keeps a second run off the same MODEL_DIR (`hold_run_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import orbax.checkpoint as ocp

from elm_jax import expert_stack, partitioning, tf_input
from elm_jax.checkpoints import expert_files
from elm_jax.training import train_step as ts
from elm_jax.training.config import TrainConfig
from elm_jax.training.errors import TrainingError



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


def exported_metrics(config: TrainConfig, names) -> Optional[dict[str, dict[str, float]]]:
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


def export(config: TrainConfig, names, model_config, expert_config, optimizer_config,
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


# ---------------------------------------------------------------------------- the run lock
LOCK_FILE = "train.lock"
# Errors of a file system that keeps no locks (some network mounts): the record decides alone.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def hold_run_lock(model_dir: str) -> Iterator[None]:
  """Holds `<model_dir>/train.lock` (a local or mounted MODEL_DIR) while the body runs, so that a
  second `elm-jax train` started on the same MODEL_DIR is refused at once, naming this one, instead of both writing checkpoints
  there. The lock is the kernel's (flock), which ends with its process however it ends; the file
  records host, pid and start time for the message, and is removed when the body ends. A file
  left by a process that has ended (a kill) is taken over with a note; one recorded by another
  host is refused with how to clear it, since whether that run still lives cannot be seen from
  here."""
  path = os.path.join(model_dir, LOCK_FILE)
  lock = _acquire(model_dir, path)
  try:
    yield
  finally:
    try:
      if os.path.samestat(os.stat(path), os.fstat(lock.fileno())):
        os.unlink(path)
    except OSError:
      pass  # gone already; the kernel lock is released below either way
    lock.close()


def _acquire(model_dir: str, path: str):
  """The open, locked lock file, with this process's record written into it."""
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise TrainingError(f"{path}: is a symbolic link; expected the lock file of `elm-jax train` "
                            "(delete the link)") from None
      raise TrainingError(f"MODEL_DIR={model_dir}: cannot create its lock file {path} ({e.strerror})") from None
    lock = os.fdopen(fd, "r+")
    kernel_lock = True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _record(lock)
      lock.close()
      raise TrainingError(f"MODEL_DIR={model_dir}: in use by `elm-jax train` {_holder_words(holder)}; wait "
                          "for it to end, or train into another MODEL_DIR") from None
    except OSError as e:
      if e.errno not in _NO_LOCKS:
        lock.close()
        raise
      kernel_lock = False
    try:
      current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
      current = None
    if current is not None and os.path.samestat(current, os.fstat(fd)):
      break
    lock.close()  # the run that held it removed it as we opened it: lock the new one
  holder = _record(lock)
  if holder is not None:
    if holder.get("host") != socket.gethostname():
      lock.close()
      raise TrainingError(f"MODEL_DIR={model_dir}: in use by `elm-jax train` {_holder_words(holder)}; whether "
                          f"it still runs cannot be seen from this host: if that run is no longer running, "
                          f"delete {path}")
    if not kernel_lock and _alive(holder.get("pid")):
      lock.close()
      raise TrainingError(f"MODEL_DIR={model_dir}: in use by `elm-jax train` {_holder_words(holder)}; wait "
                          "for it to end, or train into another MODEL_DIR")
    print(f"note: {path}: took over the lock of pid {holder.get('pid')} on this host, which is no longer "
          "running", file=sys.stderr)
  lock.seek(0)
  lock.truncate()
  json.dump({"host": socket.gethostname(), "pid": os.getpid(),
             "started": datetime.datetime.now().isoformat(timespec="seconds")}, lock)
  lock.flush()
  return lock


def _record(lock) -> Optional[dict[str, Any]]:
  """The holder's record in the lock file (None: empty or unreadable)."""
  try:
    lock.seek(0)
    record = json.loads(lock.read() or "null")
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _holder_words(holder: Optional[dict[str, Any]]) -> str:
  if holder is None:
    return "another process (its record is not written yet)"
  host, pid, since = holder.get("host"), holder.get("pid"), holder.get("started")
  if host == socket.gethostname():
    return f"pid {pid} on this host ({host}, since {since})"
  return f"pid {pid} on host {host!r} (since {since})"


def _alive(pid: Any) -> bool:
  """Whether process `pid` of this host is running (only used where the file system keeps no
  locks)."""
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
