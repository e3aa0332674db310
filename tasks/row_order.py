"""Which rows of its data an expert trains on, in which order, at every step: the one place
that turns an expert's task or mixture into batches.

An expert's data is a SeqIO task or mixture. Each member task reads the rows of one split (its
source's, or, for a task cut to a sample by `register_sample`, the sampled rows of another
task's split: indices into it, never a copy), and one of three orders arranges them:

- 'concatenated' (a task; a mixture registered so, such as an adapter dataset expert's prompts,
  which the paper's code concatenates): every epoch is one permutation of all the members'
  sampled rows, drawn from the seed and the epoch's number, as the paper's trainer (a shuffling
  DataLoader) draws one per epoch.
- 'template_per_row' (a full-parameter dataset expert): the members are templates of one dataset
  whose splits hold the same rows; every epoch is one permutation of the sampled rows, each row
  rendered by one template drawn for it in that epoch (the paper's companion trainer draws a
  template per example at every `__getitem__`). Only templates whose split holds every row can
  be drawn for every row (see `register_order`).
- 'rates' (every other mixture, T0's training mixture among them): each position draws a member
  at the mixture's rates (T0's examples-proportional mixing), and each member streams its split
  through SeqIO's own pipeline (its shuffle buffer, repeated), as T5 and T0 read a mixture.

Epochs of the first two orders are aligned to batches: epoch e is steps [e * S, (e + 1) * S) with
S = ceil(rows / batch), and the rows missing from its last batch are empty (all-zero features,
loss weight 0), as the paper's DataLoader ends an epoch with a short batch. Which row sits at
(step, row of the batch) is a function of the seed alone, so a process reads only its own rows
of each batch, any number of processes read together what one process reads, and a run resumed
at step s starts reading at step s (no replay). The permutations are NumPy's (PCG64, seeded by
(seed, epoch)), not the paper's PyTorch draws: the same rows per epoch, not in the paper's order.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import seqio

from elm_jax import tf_input
from elm_jax.errors import UserInputError
from tasks import p3

ORDERS = ("concatenated", "template_per_row", "rates")
_SAMPLES: dict[str, tuple[str, Callable[[int], Optional[np.ndarray]]]] = {}
_ORDERS: dict[str, str] = {}
_RATE_CHUNK = 1 << 16  # positions whose members one seeded draw decides ('rates')


class RowOrderError(UserInputError):
  """Data whose rows cannot be arranged as asked (an empty split, a sample past its split)."""


def register_sample(task: str, source_task: str, keep: Callable[[int], Optional[np.ndarray]]) -> None:
  """Task `task` trains on the rows of `source_task`'s train split that `keep(n)` marks, given
  that split's n rows: a bool mask [n], or None for every row. Its own preprocessors apply."""
  _SAMPLES[task] = (source_task, keep)


def register_order(mixture: str, order: str) -> None:
  """How `mixture`'s members are arranged (`ORDERS`); a mixture not registered uses 'rates'."""
  if order not in ORDERS:
    raise RowOrderError(f"order of mixture {mixture!r}: expected one of {list(ORDERS)}, got {order!r}")
  _ORDERS[mixture] = order


def order_of(name: str) -> str:
  """The order of a registered task ('concatenated') or mixture."""
  if name in seqio.MixtureRegistry.names():
    return _ORDERS.get(name, "rates")
  return "concatenated"


# ------------------------------------------------------------------------------ reading rows
class _Records:
  """A P3 split read by record index (`p3.RecordIndex`); rows are serialized records."""

  def __init__(self, source: p3.P3Source, split: str):
    tf = tf_input.tensorflow()
    directory = source.subset_dir()
    self.index = p3.RecordIndex(directory, split)
    self.parse = p3.record_parser(directory, split)
    self.signature = tf.TensorSpec([], tf.string)
    self.block_signature = tf.TensorSpec([None], tf.string)
    self.where = f"{directory} ({split})"

  def __len__(self) -> int:
    return len(self.index)

  def read(self, i: int):
    return self.index.read(i)

  def read_block(self, indices: np.ndarray) -> np.ndarray:
    """The records at `indices`, as one array of serialized records [len(indices)]."""
    return np.array([self.index.read(int(i)) for i in indices], dtype=object)

  def decode(self, ds):
    return ds.map(self.parse)


class _Held:
  """A split read once from its source into memory (sources that are not P3 files: generated,
  rendered from raw data, continual JSON): rows are examples as NumPy values."""

  def __init__(self, task: seqio.Task, split: str):
    tf = tf_input.tensorflow()
    ds = task.source.get_dataset(split=split, shuffle=False)
    self.rows = list(ds.as_numpy_iterator())
    self.signature = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), ds.element_spec)
    self.block_signature = None  # rows of any structure: handed over one at a time
    self.where = f"task {task.name!r} ({split})"

  def __len__(self) -> int:
    return len(self.rows)

  def read(self, i: int):
    return self.rows[i]

  def decode(self, ds):
    return ds


_READERS: dict[tuple[str, str], tuple[Any, Any]] = {}  # (task, split) -> (its source, reader)
_READERS_LOCK = threading.Lock()


def _reader(source_task: str, split: str):
  """The reader of a task's split, kept while that task keeps its source (a task registered again
  under the same name is read again)."""
  task = seqio.TaskRegistry.get(source_task)
  with _READERS_LOCK:
    kept = _READERS.get((source_task, split))
    if kept is None or kept[0] is not task.source:
      reader = (_Records(task.source, split) if isinstance(task.source, p3.P3Source)
                else _Held(task, split))
      kept = _READERS[(source_task, split)] = (task.source, reader)
    return kept[1]


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of an expert's data: `task` (whose preprocessors render its rows), the reader of
  the split its rows come from, and `rows`, its sampled row indices into that split, in file
  order."""
  task: seqio.Task
  reader: Any
  rows: np.ndarray

  @property
  def name(self) -> str:
    return self.task.name


def member(task_name: str, split: str) -> Member:
  """The rows task `task_name` reads from `split` (its registered sample on 'train')."""
  task = seqio.TaskRegistry.get(task_name)
  source, keep = _SAMPLES.get(task_name, (task_name, None))
  if split != "train":
    source, keep = task_name, None
  reader = _reader(source, split)
  n = len(reader)
  mask = keep(n) if keep is not None else None
  if mask is not None and len(mask) != n:
    raise RowOrderError(f"{reader.where}: task {task_name!r}'s sample marks {len(mask)} rows; the "
                        f"split has {n}")
  rows = np.arange(n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
  return Member(task, reader, rows)


# ------------------------------------------------------------------------------ the orders
def _generator(seed: int, *words: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % (1 << 32), *words])))


class EpochOrder:
  """The batch-aligned orders ('concatenated', 'template_per_row') of `members` at `batch_size`
  rows per step: `locate(step, rows)` says which member and which of its rows fill rows `rows`
  of step `step`'s batch."""

  def __init__(self, members: Sequence[Member], order: str, batch_size: int, seed: int):
    self.members, self.order, self.batch_size, self.seed = list(members), order, batch_size, seed
    if not self.members:
      raise RowOrderError("an expert's data has no member tasks with rows")
    if order == "concatenated":
      sizes = np.array([len(m.rows) for m in self.members], np.int64)
      self.offsets = np.concatenate([[0], np.cumsum(sizes)])
      self.epoch_rows = int(self.offsets[-1])
    else:
      self.epoch_rows = len(self.members[0].rows)
    if self.epoch_rows == 0:
      raise RowOrderError(f"{', '.join(m.name for m in self.members)}: no rows to train on")
    self.steps_per_epoch = math.ceil(self.epoch_rows / batch_size)
    self._epochs: dict[int, tuple[np.ndarray, Optional[np.ndarray]]] = {}
    self._lock = threading.Lock()

  def _epoch(self, epoch: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    with self._lock:
      if epoch not in self._epochs:
        permutation = _generator(self.seed, epoch).permutation(self.epoch_rows)
        templates = None
        if self.order == "template_per_row":
          templates = _generator(self.seed, epoch, 1).integers(len(self.members), size=self.epoch_rows)
        if len(self._epochs) >= 4:
          self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = (permutation, templates)
      return self._epochs[epoch]

  def locate(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(member [r], row [r]) for rows `rows` of step `step`'s batch: the member index and the
    index into that member's `rows` (its split row is `members[m].rows[row]`); member -1 marks an
    empty row at the end of an epoch."""
    epoch, k = divmod(step, self.steps_per_epoch)
    positions = k * self.batch_size + np.arange(self.batch_size)[rows]
    permutation, templates = self._epoch(epoch)
    member = np.full(len(positions), -1, np.int64)
    row = np.zeros(len(positions), np.int64)
    valid = positions < self.epoch_rows
    flat = permutation[positions[valid]]
    if self.order == "concatenated":
      member[valid] = np.searchsorted(self.offsets, flat, side="right") - 1
      row[valid] = flat - self.offsets[member[valid]]
    else:
      member[valid] = templates[positions[valid]]
      row[valid] = flat
    return member, row

  def split_rows(self, step: int, rows: slice = slice(None)) -> list[Optional[tuple[str, int]]]:
    """(member task, split row) of each of rows `rows` of step `step`'s batch; None: empty."""
    member, row = self.locate(step, rows)
    return [None if m < 0 else (self.members[m].name, int(self.members[m].rows[r]))
            for m, r in zip(member, row)]


def epoch_order(name: str, split: str, batch_size: int, seed: int) -> EpochOrder:
  """The batch-aligned order of task or mixture `name` ('concatenated' or 'template_per_row')."""
  order = order_of(name)
  if order == "rates":
    raise RowOrderError(f"{name!r} is mixed at rates: it has no epochs")
  names = ([t.name for t in seqio.MixtureRegistry.get(name).tasks]
           if name in seqio.MixtureRegistry.names() else [name])
  members = [member(n, split) for n in names]
  if order == "template_per_row":
    members = aligned_templates(name, members)
  else:
    members = [m for m in members if len(m.rows)]
  return EpochOrder(members, order, batch_size, seed)


def aligned_templates(name: str, members: list[Member]) -> list[Member]:
  """The templates of one dataset that can render each of its rows: those whose split holds the
  most rows (the whole dataset). A template whose split holds fewer (P3 keeps only the rows a
  label-dependent template applies to: trec's fine-grained, paws' `paraphrase-task`, wiki_qa's
  generation templates) cannot be aligned to the dataset's rows and is not drawn."""
  full = max(len(m.reader) for m in members)
  aligned = [m for m in members if len(m.reader) == full]
  if len({m.rows.tobytes() for m in aligned}) != 1:
    raise RowOrderError(f"mixture {name!r}: its templates over all {full} rows sample different rows; "
                        "a row is drawn once per epoch and rendered by one template, so they must agree")
  return aligned


# ------------------------------------------------------------------------------ datasets
def expert_dataset(name: str, *, split: str, seed: int, batch_size: int, rows: slice,
                   start_step: int, lengths: dict[str, int], convert: Callable):
  """Batches [rows of the batch, ...] of task or mixture `name` from step `start_step` on, endless:
  each member's rows read, parsed, put through its task's preprocessors and `convert` (which
  maps a task's examples to fixed-length features), then arranged by the name's order."""
  tf = tf_input.tensorflow()
  if order_of(name) == "rates":
    return _rates_dataset(name, split=split, seed=seed, batch_size=batch_size, rows=rows,
                          start_step=start_step, lengths=lengths, convert=convert)
  order = epoch_order(name, split, batch_size, seed)
  datasets = []
  for m, part in enumerate(order.members):
    def row_stream(m=m, part=part) -> Iterator:
      step = start_step
      while True:
        member, row = order.locate(step, rows)
        picked = part.rows[row[member == m]]
        if part.reader.block_signature is not None:  # one hand-over per step: from_generator's
          if len(picked):                            # cost is per element
            yield part.reader.read_block(picked)
        else:
          yield from (part.reader.read(int(i)) for i in picked)
        step += 1
    if part.reader.block_signature is not None:
      ds = tf.data.Dataset.from_generator(row_stream, output_signature=part.reader.block_signature).unbatch()
    else:
      ds = tf.data.Dataset.from_generator(row_stream, output_signature=part.reader.signature)
    ds = part.task.preprocess_precache(part.reader.decode(ds), seed=seed)
    ds = part.task.preprocess_postcache(ds, sequence_length=lengths, seed=seed)
    datasets.append(convert(ds, part.name))
  empty = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda s: tf.zeros(s.shape, s.dtype), datasets[0].element_spec)).repeat()

  def choices() -> Iterator[np.ndarray]:
    step = start_step
    while True:
      member, _ = order.locate(step, rows)
      yield np.where(member < 0, len(datasets), member)
      step += 1
  choice = tf.data.Dataset.from_generator(choices, output_signature=tf.TensorSpec([None], tf.int64)).unbatch()
  width = len(range(batch_size)[rows])
  return tf.data.Dataset.choose_from_datasets(datasets + [empty], choice).batch(width, drop_remainder=True)


def _rates_dataset(name: str, *, split: str, seed: int, batch_size: int, rows: slice, start_step: int,
                   lengths: dict[str, int], convert: Callable):
  """A mixture at its rates: every process reads whole batches (members are streams) and keeps
  `rows` of each; a resumed run skips, in each member's stream, the rows taken before."""
  tf = tf_input.tensorflow()
  mixture = seqio.MixtureRegistry.get(name)
  tasks = list(mixture.tasks)
  rates = np.array([float(mixture.get_rate(t)) for t in tasks])
  if not (rates > 0).any():
    raise RowOrderError(f"mixture {name!r}: every member's rate is 0")
  probabilities = rates / rates.sum()
  start = start_step * batch_size

  def chunk(c: int) -> np.ndarray:
    return _generator(seed, c, 2).choice(len(tasks), size=_RATE_CHUNK, p=probabilities)
  taken = np.zeros(len(tasks), np.int64)
  for c in range(start // _RATE_CHUNK):
    taken += np.bincount(chunk(c), minlength=len(tasks))
  taken += np.bincount(chunk(start // _RATE_CHUNK)[:start % _RATE_CHUNK], minlength=len(tasks))
  datasets = []
  for i, task in enumerate(tasks):
    member_seed = (seed * 1_000_003 + zlib.crc32(task.name.encode())) % (1 << 32)
    ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=True, seed=member_seed,
                          num_epochs=None)
    datasets.append(convert(ds, task.name).skip(int(taken[i])))

  def choices() -> Iterator[int]:
    c, offset = divmod(start, _RATE_CHUNK)
    while True:
      yield from chunk(c)[offset:].tolist()
      c, offset = c + 1, 0
  choice = tf.data.Dataset.from_generator(choices, output_signature=tf.TensorSpec([], tf.int64))
  picked = np.arange(batch_size)[rows]
  return tf.data.Dataset.choose_from_datasets(datasets, choice).batch(batch_size, drop_remainder=True).map(
      lambda batch: {k: tf.gather(v, picked) for k, v in batch.items()})
