"""The one trainer: one expert, hundreds in groups, a dataset expert on a mixture, or the
multitask baseline, over a frozen backbone, with preemption-safe checkpoints.

Each expert draws its batches from its own SeqIO task or mixture; one compiled step updates
all of them (`train_step.train_step`). Orbax keeps the last `keep` checkpoints (step, expert
parameters, optimizer state); the input position is restored by replaying the deterministic
input stream, so a run killed at any moment and restarted ends with the same parameters as one
never interrupted. A non-finite loss stops the run, naming the expert and the step, after
saving the last good state. Each expert is exported to `<model_dir>/experts/<name>/`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from jax.sharding import PartitionSpec

from elm_jax import partitioning, tf_input, tree_paths
from elm_jax.errors import UserInputError
from elm_jax.library import expert_files
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.t5 import Transformer, init_params, logical_axes
from elm_jax.models.t5_config import T5Config
from elm_jax.training import train_step as ts

FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights")


class TrainingError(UserInputError):
  """A run that cannot start (bad settings) or that diverged."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What to train: one expert per entry of `expert_tasks` (SeqIO task or mixture names)."""
  model_dir: str
  expert_tasks: tuple[str, ...]
  steps: int
  batch_size: int = 8
  input_length: int = 256
  target_length: int = 128
  expert_names: Optional[tuple[str, ...]] = None
  seed: int = 42
  # Every expert's new modules start from the same draw (from `seed`), as in the paper's code,
  # where each expert is its own run with seed 42. Averaging experts (top-k merging, composed
  # instructions) relies on it; False draws each expert's from `seed + e` instead.
  shared_init: bool = True
  save_every: int = 100
  keep: int = 3
  log_every: int = 10
  split: str = "train"
  backbone_checkpoint: Optional[str] = None  # recorded in each expert's metadata
  shuffle_buffer_size: Optional[int] = None  # per expert; None: SeqIO's default (1000)
  # Background input threads (tf.data autotuning and prefetch). None: on, except on a CPU
  # backend, where they compete with XLA for the same cores (and delay shutdown by seconds).
  input_prefetch: Optional[bool] = None

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
  for field in ("input_length", "target_length"):
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
      raise TrainingError(f"TrainConfig.{field}: expected an integer of at least 2, got {value!r}")
  if os.path.lexists(config.model_dir) and not os.path.isdir(config.model_dir):
    raise TrainingError(f"MODEL_DIR={config.model_dir}: exists and is not a directory")


def check_tasks(tasks: Sequence[str], vocab_size: Optional[int] = None) -> list:
  """The SeqIO task or mixture of each name, refused when one is not registered or (with
  `vocab_size`, the model's) uses a larger vocabulary; reads no data."""
  import seqio
  providers = []
  for name in tasks:
    try:
      provider = seqio.get_mixture_or_task(name)
    except ValueError:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} is not a registered SeqIO task or "
                          "mixture (see `elm-jax tasks list`)") from None
    task_vocab = provider.output_features["targets"].vocabulary.vocab_size
    if vocab_size is not None and task_vocab > vocab_size:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} uses a vocabulary of {task_vocab} "
                          f"tokens, more than the model's vocab_size {vocab_size}")
    providers.append(provider)
  return providers


def expert_batches(config: TrainConfig, vocab_size: Optional[int] = None
                   ) -> Iterator[dict[str, np.ndarray]]:
  """An endless, deterministic stream of stacked batches [E, batch, length]. Every task is
  checked now (`check_tasks`); the input pipelines are built when the first batch is asked for."""
  return _stacked_stream(config, check_tasks(config.expert_tasks, vocab_size))


def _stacked_stream(config: TrainConfig, providers) -> Iterator[dict[str, np.ndarray]]:
  import seqio
  tf_input.tensorflow()
  lengths = {"inputs": config.input_length, "targets": config.target_length}
  options = _input_options(config.input_prefetch)
  iterators = []
  for e, (name, provider) in enumerate(zip(config.expert_tasks, providers)):
    shuffle = {}
    if config.shuffle_buffer_size is not None and isinstance(provider, seqio.Task):
      shuffle["shuffle_buffer_size"] = config.shuffle_buffer_size  # mixtures keep SeqIO's default
    ds = provider.get_dataset(sequence_length=lengths, split=config.split, shuffle=True,
                              seed=config.seed + e, num_epochs=None, **shuffle)
    ds = unpacked_encdec_features(ds, lengths, name).batch(config.batch_size, drop_remainder=True)
    iterators.append(ds.with_options(options).as_numpy_iterator())
  for batches in zip(*iterators):
    yield {k: np.stack([b[k] for b in batches]) for k in FEATURES}


def batch_shapes(config: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one `expert_batches` element."""
  num = len(config.expert_tasks)
  return {k: jax.ShapeDtypeStruct((num, config.batch_size, config.input_length if k == "encoder_input_tokens"
                                   else config.target_length), np.int32) for k in FEATURES}


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


def unpacked_encdec_features(ds, lengths: dict[str, int], name: str):
  """What `seqio.EncDecFeatureConverter(pack=False)` makes of a task's dataset, in one map:
  inputs and targets trimmed and zero-padded to `lengths`, decoder inputs the targets shifted
  right after a 0 (BOS), loss weights 1 on non-padding targets; all int32 (the test compares
  the two). SeqIO's converter builds a dozen validation and conversion maps per call, about
  0.2 s of graph tracing for each of hundreds of experts."""
  tf = tf_input.tensorflow()
  for key in ("inputs", "targets"):
    spec = ds.element_spec.get(key) if isinstance(ds.element_spec, dict) else None
    if spec is None or spec.shape.rank != 1 or not spec.dtype.is_integer:
      raise TrainingError(f"TrainConfig.expert_tasks: {name!r} yields {key!r} as "
                          f"{spec if spec is not None else 'nothing'}; expected a rank-1 integer "
                          "tensor of token ids (a tokenized text-to-text task)")
  li, lt = lengths["inputs"], lengths["targets"]

  def pad(tokens, length):
    tokens = tf.cast(tokens[:length], tf.int32)
    return tf.ensure_shape(tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]]), [length])

  def convert(example):
    inputs, targets = pad(example["inputs"], li), pad(example["targets"], lt)
    return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_input_tokens": tf.concat([tf.zeros([1], tf.int32), targets[:-1]], 0),
            "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.int32)}
  return ds.map(convert)


def _input_options(prefetch: Optional[bool]):
  tf = tf_input.tensorflow()
  options = tf.data.Options()
  if prefetch is None:
    prefetch = jax.default_backend() != "cpu"
  if not prefetch:
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    options.threading.private_threadpool_size = 1
  return options


def initial_experts(model_config: T5Config, expert_config: ExpertConfig, backbone_params: dict,
                    num_experts: int, seed: int, shared_init: bool = True) -> tuple[dict, dict]:
  """(frozen backbone, stacked expert parameters [E, ...]).

  New expert modules (adapters, LoRA factors) are initialised from `seed`, the same draw for
  every expert (`shared_init`, as the paper's runs), or from `seed + e` for expert e;
  trainable backbone tensors (layer-norm scales, or everything for full fine-tuning) start
  from the backbone's pretrained values.
  """
  def fresh_expert(seed_e):
    fresh = nn.unbox(init_params(model_config, jax.random.PRNGKey(seed_e), expert=expert_config))
    return split_params(fresh, expert_config)[1]

  seeds = np.arange(seed, seed + num_experts, dtype=np.uint32)
  shapes = tree_paths.flatten(jax.eval_shape(jax.vmap(fresh_expert), seeds))
  pretrained = tree_paths.flatten(backbone_params)
  flat = {p: np.broadcast_to(np.asarray(pretrained[p], np.float32), shapes[p].shape).copy()
          for p in shapes if p in pretrained}
  if len(flat) < len(shapes):
    # Compiled (eager initialisation dispatches every op on its own). One draw shared by all
    # experts compiles in 1.7 s for the demo's model; a vmapped draw per expert in 4.3 s.
    if shared_init:
      one = tree_paths.flatten(jax.device_get(jax.jit(fresh_expert)(np.uint32(seed))))
      fresh = {p: np.broadcast_to(x, shapes[p].shape) for p, x in one.items()}
    else:
      fresh = tree_paths.flatten(jax.device_get(jax.jit(jax.vmap(fresh_expert))(seeds)))
    flat.update({p: np.asarray(x, np.float32).copy() for p, x in fresh.items() if p not in flat})
  frozen, _ = split_params(backbone_params, expert_config)
  return frozen, tree_paths.unflatten(flat)


def unstack(tree: Any, index: int) -> Any:
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], tree)


class _Checkpoints:
  """Orbax CheckpointManager of {step, params, opt_state}, with fallback past a damaged step."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
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
      return ts.ExpertTrainState(**restored)
    return None


class _Logs:
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
  stream = expert_batches(config, model_config.vocab_size)  # every task is checked here
  checkpoints = _Checkpoints(os.path.join(config.model_dir, "checkpoints"), config.keep)
  # The input pipelines (Python and TensorFlow) build on another thread while this one
  # initialises the experts and compiles the step (XLA, which releases the GIL).
  first = None
  if max(checkpoints.manager.all_steps(), default=0) < config.steps:
    first = _Ahead(lambda: next(stream))
  model = Transformer(model_config, expert_config)
  backbone, stacked = initial_experts(model_config, expert_config, backbone_params, len(names), config.seed,
                                      shared_init=config.shared_init)
  optimizer = ts.make_optimizer(optimizer_config, config.steps)
  state = ts.init_train_state(stacked, optimizer)
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state = restored
  start = int(state.step)
  noisy = model_config.dropout_rate > 0 or (model_config.moe is not None and model_config.moe.router_jitter > 0)
  rng = jax.random.PRNGKey(config.seed) if noisy else None  # folded with the step: resumable
  step = functools.partial(ts.train_step, model=model, optimizer=optimizer, dropout_rng=rng)
  if partitioner is None:
    step_fn = jax.jit(step)
  else:
    backbone_specs, expert_specs = split_params(logical_axes(model_config, expert_config), expert_config)
    state_specs = ts.ExpertTrainState(PartitionSpec(), ts.stacked_expert_specs(expert_specs),
                                      ts.stacked_leading_axis_specs(state.opt_state),
                                      PartitionSpec("expert"))
    state = partitioner.place(state, state_specs)
    backbone = partitioner.place(backbone, backbone_specs)
    step_fn = partitioner.partition(
        step, (state_specs, backbone_specs, {k: PartitionSpec("expert", "batch", "length") for k in FEATURES}),
        (state_specs, PartitionSpec("expert")))
  if start < config.steps:
    try:
      step_fn.lower(state, backbone, batch_shapes(config)).compile()  # the first step finds it
    except Exception as e:  # the first step compiles again and reports it
      logging.info("ahead-of-time compilation failed (%s: %s)", type(e).__name__, e)
  if first is not None:
    stream = itertools.chain([first.result()], stream)
  batches = itertools.islice(stream, start, None)  # replay to the saved position
  logs = _Logs(config.model_dir, names)
  bar = _progress_bar(start, config.steps, names) if progress else None
  # Metrics of step s are read back while step s+1 runs (one step of lag), so the host never
  # waits on the device between steps; `pending` keeps the state from before the unchecked step.
  metrics: dict[str, np.ndarray] = {}
  meter = {"tokens": 0.0, "clock": time.perf_counter()}
  pending = None

  def check(done: int, step_metrics, before: ts.ExpertTrainState) -> dict[str, np.ndarray]:
    values = jax.device_get(step_metrics)
    bad = np.where(~np.isfinite(values["loss"]))[0]
    if len(bad):
      checkpoints.save(before)
      raise TrainingError(f"expert {names[bad[0]]!r} ({config.expert_tasks[bad[0]]}) has a non-finite "
                          f"loss at step {done}; saved the last good state (step {int(before.step)}) "
                          f"in {config.model_dir}/checkpoints")
    meter["tokens"] += float(values["tokens"].sum())
    if done % config.log_every == 0 or done == config.steps:
      rate = meter["tokens"] / max(time.perf_counter() - meter["clock"], 1e-9)
      logs.write(done, values, rate)
      if bar is not None:
        bar.set_postfix_str(" ".join(f"{n[:16]}={values['loss'][i]:.3f}" for i, n in
                                     enumerate(names[:4])) + f" tok/s={rate:.0f}")
      meter["tokens"], meter["clock"] = 0.0, time.perf_counter()
    return values

  for step in range(start, config.steps):
    before = state
    state, step_metrics = step_fn(state, backbone, next(batches))
    if pending is not None:
      metrics = check(*pending)
    done = step + 1
    pending = (done, step_metrics, before)
    if done % config.save_every == 0 or done == config.steps:
      metrics = check(*pending)  # never checkpoint an unchecked state
      pending = None
      checkpoints.save(state)
    if bar is not None:
      bar.update(1)
    if on_step is not None:
      on_step(done)
  if pending is not None:
    metrics = check(*pending)
  if bar is not None:
    bar.close()
  logs.close()
  if not metrics:
    # Restored at the last step (a finished run started again): its experts were exported
    # with their final metrics; keep them rather than overwrite them with none.
    exported = _exported_metrics(config, names)
    if exported is not None:
      return exported
  fingerprint = backbone_fingerprint or expert_files.backbone_fingerprint(backbone_params)
  _export(config, names, model_config, expert_config, optimizer_config, fingerprint, state, metrics)
  return {n: {k: float(v[i]) for k, v in metrics.items()} for i, n in enumerate(names)} if metrics else {}


def _exported_metrics(config: TrainConfig, names) -> Optional[dict[str, dict[str, float]]]:
  """Each expert's recorded final metrics, if all were exported after `config.steps` steps."""
  out = {}
  for name in names:
    directory = config.expert_dir(name)
    try:
      meta = expert_files.load_metadata(directory)
    except expert_files.ExpertFileError:
      return None
    if meta.steps != config.steps or not os.path.isfile(os.path.join(directory, expert_files.TENSORS_FILE)):
      return None
    out[name] = dict(meta.metrics)
  return out


def _progress_bar(start: int, total: int, names: Sequence[str]):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc=f"training {len(names)} expert(s)", file=sys.stderr,
              dynamic_ncols=True)


def _export(config: TrainConfig, names, model_config, expert_config, optimizer_config,
            fingerprint: str, state, metrics) -> None:
  for e, name in enumerate(names):
    meta = expert_files.ExpertMetadata(
        name=name, task=config.expert_tasks[e], expert_config=dataclasses.asdict(expert_config),
        backbone_fingerprint=fingerprint,
        training_config={**dataclasses.asdict(config), "optimizer": dataclasses.asdict(optimizer_config),
                         "model": dataclasses.asdict(model_config)},
        steps=int(state.step), metrics={k: float(v[e]) for k, v in metrics.items()})
    expert_files.save_expert(config.expert_dir(name), unstack(state.params, e), meta, overwrite=True)
