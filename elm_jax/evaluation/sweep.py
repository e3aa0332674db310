"""Evaluation sweeps that resume after a kill and split over jobs.

A sweep evaluates the selected experts on every task of a task or mixture (each expert alone,
or the experts routed together by a method: a `RoutedColumn`, one column like an expert's, whose
digest stands for its method, options and experts). Its work is cut into
*units*, in a fixed order: for each task (as the mixture lists them), the selected experts in
chunks of `unit_experts` (default: all of them, one unit per task). Each finished unit is
written atomically to `OUTPUT_DIR/units/TASK/UNIT.json` with the record of what it depends on:

- the task's inputs: its name, split, `max_examples`, the number of examples and a sha256 of
  their inputs, answer choices, labels and targets;
- the backbone's fingerprint and the options that change scores (batch size, lengths, beam
  size, the softmax cut);
- for each expert, a sha256 over its library files' sha256s.

A rerun reads every unit file, keeps each (task, expert) result whose record matches what the
run would compute today, and computes only the experts that lack one; an expert added to the
library is computed alone, an expert whose files changed again. The reports (results.json,
results.csv, results.md, predictions/) are assembled from the unit files in every case, so a
resumed sweep writes the same bytes as one never interrupted.

`shard=(i, N)` computes only the units whose index in the fixed order is i mod N and writes no
report; `assemble` computes nothing and writes the reports, refusing (naming the unit) when a
unit is missing or its file was made with other inputs. Every process of a multi-process run
computes every unit together (one mesh); process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from elm_jax import files, partitioning, tf_input
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval
from elm_jax.evaluation.expert_eval import TaskResult
from elm_jax.expert_stack import ExpertsOnBackbone

FORMAT_VERSION = 1
UNITS_DIR = "units"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


class SweepError(UserInputError):
  """A sweep that cannot be resumed or assembled as asked (a missing or mismatched unit)."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """One task x a chunk of experts; `index` is its place in the sweep's fixed order."""
  index: int
  task: str
  experts: tuple[str, ...]

  def describe(self) -> str:
    experts = ", ".join(self.experts[:3]) + (f", ... ({len(self.experts)} experts)" if len(self.experts) > 3 else "")
    return f"unit {self.index} (task {self.task}; {experts})"


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  """What a unit's scores depend on besides its task's rows, its experts and the backbone."""
  split: str = "validation"
  max_examples: Optional[int] = None
  batch_size: int = 32
  max_input_length: int = 512
  max_target_length: int = 128
  beam_size: int = 1
  softmax_vocab_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RoutedColumn:
  """A column of the sweep computed by routing the loaded experts together
  (`library/routing_methods.py`) instead of by one expert: its `name` ('routed:arrow'), a
  sha256 `digest` of what its results depend on besides the task (the method, its options, the
  routed experts' files and the gates or keys it reads), and `evaluate` (loaded experts, task,
  the task's rows) -> TaskResult with the one column `name`."""
  name: str
  digest: str
  evaluate: Callable[[ExpertsOnBackbone, str, list], TaskResult]


def plan_units(tasks: Sequence[str], experts: Sequence[str], unit_experts: Optional[int] = None) -> list[Unit]:
  """The sweep's units in their fixed order: tasks in order, each over `experts` in chunks of
  `unit_experts` (None: all)."""
  size = unit_experts or max(len(experts), 1)
  units = []
  for task in tasks:
    for start in range(0, len(experts), size):
      units.append(Unit(len(units), task, tuple(experts[start:start + size])))
  return units


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
  """`i/N` -> (i, N) with 0 <= i < N; None stays None."""
  if text is None:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
  if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
    raise SweepError(f"--shard={text}: expected i/N with 0 <= i < N (e.g. --shard=0/3)")
  return int(match.group(1)), int(match.group(2))


def shard_units(units: Sequence[Unit], shard: Optional[tuple[int, int]]) -> list[Unit]:
  """The units shard (i, N) computes: those whose index is i mod N (all without a shard)."""
  if shard is None:
    return list(units)
  i, n = shard
  return [u for u in units if u.index % n == i]


def expert_digest(files_record: dict[str, Any]) -> str:
  """One sha256 for an expert from its library files' recorded sha256s (manifest `files`)."""
  listing = sorted((name, entry.get("sha256")) for name, entry in files_record.items())
  return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def rows_digest(rows: Sequence[dict[str, Any]]) -> str:
  """A sha256 of what evaluation reads from a task's rows."""
  fields = [{k: row.get(k) for k in ("inputs", "answer_choices", "label", "targets")} for row in rows]
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def task_record(task: str, rows: Sequence[dict[str, Any]], options: SweepOptions,
                backbone_fingerprint: Optional[str]) -> dict[str, Any]:
  """What every unit of `task` depends on besides its experts."""
  return {"task": task, "split": options.split, "max_examples": options.max_examples,
          "examples": len(rows), "rows_sha256": rows_digest(rows), "backbone": backbone_fingerprint,
          "batch_size": options.batch_size, "max_input_length": options.max_input_length,
          "max_target_length": options.max_target_length, "beam_size": options.beam_size,
          "softmax_vocab_size": options.softmax_vocab_size}


def _directory_name(task: str) -> str:
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
  return "_" + name if name in ("", ".", "..") else name


@dataclasses.dataclass
class Found:
  """A task's stored results: expert -> (its result, the unit file) for records that match
  today's; and expert -> why the files that hold it do not match."""
  valid: dict[str, tuple[dict[str, Any], str]] = dataclasses.field(default_factory=dict)
  stale: dict[str, str] = dataclasses.field(default_factory=dict)
  task_facts: Optional[dict[str, Any]] = None


class UnitStore:
  """The unit files of a sweep's output directory."""

  def __init__(self, output_dir: str):
    self.root = os.path.join(output_dir, UNITS_DIR)

  def task_dir(self, task: str) -> str:
    return os.path.join(self.root, _directory_name(task))

  def read(self, task: str, record: dict[str, Any], digests: dict[str, str], stream=None) -> Found:
    """Every unit file of `task`, sorted by name, sorted into results that match `record` and
    `digests` and the reasons the others do not (a damaged file is skipped with a note)."""
    found = Found()
    directory = self.task_dir(task)
    if not os.path.isdir(directory):
      return found
    for name in sorted(os.listdir(directory)):
      if not name.endswith(".json") or name.startswith("."):
        continue
      path = os.path.join(directory, name)
      try:
        with open(path, "rb") as f:
          unit = json.loads(f.read())
        depends, results = unit["depends"], unit["results"]
        facts = unit["task"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"note: {path}: not a readable unit file ({type(e).__name__}); it is recomputed",
              file=stream or sys.stderr)
        continue
      differences = _differences(depends.get("task"), record)
      for expert, result in results.items():
        if expert not in digests or expert in found.valid:
          continue
        recorded = (depends.get("experts") or {}).get(expert)
        if differences:
          found.stale[expert] = f"{path} was made with other inputs ({differences})"
        elif recorded != digests[expert]:
          found.stale[expert] = f"{path} holds expert {expert!r} as its files were before (they changed since)"
        else:
          found.valid[expert] = (result, path)
          found.task_facts = facts
          found.stale.pop(expert, None)
    return found

  def write(self, unit: Unit, record: dict[str, Any], digests: dict[str, str], result: TaskResult) -> str:
    """Writes a finished unit's results (its computed experts) atomically; returns the path."""
    experts = list(result.metrics)
    payload = {"format_version": FORMAT_VERSION, "unit": unit.index,
               "depends": {"task": record, "experts": {e: digests[e] for e in experts}},
               "task": _task_facts(result), "results": _expert_results(result)}
    data = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False).encode()
    name = f"{unit.index:06d}-{hashlib.sha256(data).hexdigest()[:16]}.json"
    directory = self.task_dir(unit.task)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    files.write_atomically(path, data)
    return path


def _differences(stored: Any, record: dict[str, Any]) -> str:
  if not isinstance(stored, dict):
    return "no record of its inputs"
  keys = [k for k in record if stored.get(k) != record[k]] + [k for k in stored if k not in record]
  return "; ".join(f"{k}: {stored.get(k)!r} there, {record.get(k)!r} now" for k in keys)


def _task_facts(result: TaskResult) -> dict[str, Any]:
  references = [p.get("label", p.get("target")) for p in result.predictions]
  # The evaluation ("rank" or "generation") under the key unit files have always stored it by.
  return {"dataset": result.dataset, "prompt": result.prompt, "kind": result.evaluation,
          "examples": result.examples, "references": references}


def _expert_results(result: TaskResult) -> dict[str, Any]:
  """Each column's metrics (by name, as a unit file stores them: a report assembled from
  results just computed and one assembled from unit files list them alike) and predictions."""
  return {expert: {"metrics": dict(sorted(result.metrics[expert].items())),
                   "predictions": [p["predictions"][expert] for p in result.predictions]}
          for expert in result.metrics}


def assemble_task(task: str, found: Found, experts: Sequence[str]) -> TaskResult:
  """A task's TaskResult from its stored unit results (every expert of `experts` present)."""
  facts = found.task_facts
  reference_key = "label" if facts["kind"] == "rank" else "target"
  metrics = {e: found.valid[e][0]["metrics"] for e in experts}
  predictions = [{"index": n, reference_key: reference,
                  "predictions": {e: found.valid[e][0]["predictions"][n] for e in experts}}
                 for n, reference in enumerate(facts["references"])]
  return TaskResult(task, facts["dataset"], facts["prompt"], facts["kind"], facts["examples"], metrics,
                    predictions)


class SweepLog:
  """What a user watches: log.jsonl (a line per finished unit with its metrics) and TensorBoard
  scalars per (expert, task) under tensorboard/EXPERT/ (every metric, tagged TASK/METRIC; one
  events file per expert per run, flushed after each unit)."""

  def __init__(self, output_dir: str, enabled: bool):
    self.output_dir, self.enabled = output_dir, enabled
    self.writers: dict[str, Any] = {}

  def event(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    os.makedirs(self.output_dir, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(os.path.join(self.output_dir, LOG_FILE), "ab+") as f:
      f.seek(0, os.SEEK_END)
      if f.tell():  # a line cut short by a kill is ended before the next one
        f.seek(-1, os.SEEK_END)
        line = (b"" if f.read(1) == b"\n" else b"\n") + line
      f.write(line)

  def unit(self, unit: Unit, result: TaskResult, seconds: float, path: str) -> None:
    if not self.enabled:
      return
    self.event({"event": "unit", "unit": unit.index, "task": unit.task, "experts": list(result.metrics),
                "examples": result.examples, "seconds": round(seconds, 3), "file": os.path.relpath(path, self.output_dir),
                "metrics": {e: m for e, m in result.metrics.items()}})
    tf = tf_input.tensorflow()
    for expert, metrics in result.metrics.items():
      if expert not in self.writers:
        self.writers[expert] = tf.summary.create_file_writer(
            os.path.join(self.output_dir, TENSORBOARD_DIR, _directory_name(expert)))
      with self.writers[expert].as_default():
        for metric, value in metrics.items():
          tf.summary.scalar(f"{unit.task}/{metric}", value, step=0)
      self.writers[expert].flush()

  def close(self) -> None:
    for writer in self.writers.values():
      writer.close()
    self.writers.clear()


def run_sweep(loaded: ExpertsOnBackbone, tasks: Sequence[str], output_dir: str, *, options: SweepOptions,
              expert_digests: dict[str, str], backbone_fingerprint: Optional[str], partitioner=None,
              expert_chunk: Optional[int] = None, unit_experts: Optional[int] = None,
              shard: Optional[tuple[int, int]] = None, assemble: bool = False, recompute: bool = False,
              progress: bool = True, stream=None, routed: Sequence[RoutedColumn] = ()
              ) -> Optional[list[TaskResult]]:
  """Evaluates every task, unit by unit, as the module docstring says, in the columns named by
  `expert_digests` (loaded experts, each alone) and then `routed` (the loaded experts routed
  together by a method, each column one unit member like an expert); returns each task's result
  (None for a shard, which writes no report)."""
  stream = stream or sys.stderr
  routed_by_name = {column.name: column for column in routed}
  expert_digests = {**expert_digests, **{column.name: column.digest for column in routed}}
  names = list(expert_digests)
  units = plan_units(tasks, names, unit_experts)
  mine = shard_units(units, shard)
  store = UnitStore(output_dir)
  needed = list(tasks) if shard is None or assemble else list(dict.fromkeys(u.task for u in mine))
  rows = {t: expert_eval.read_task_rows(t, options.split, options.max_examples) for t in needed}
  records = {t: task_record(t, rows[t], options, backbone_fingerprint) for t in needed}
  found = {t: (Found() if recompute else store.read(t, records[t], expert_digests, stream)) for t in needed}
  if assemble:
    _check_complete(units, found, output_dir)
    return [assemble_task(t, found[t], names) for t in tasks]
  todo = [(u, [e for e in u.experts if e not in found[u.task].valid]) for u in mine]
  todo = [(u, pending) for u, pending in todo if pending]
  primary = partitioning.is_primary()
  log = SweepLog(output_dir, primary)
  where = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(units)} units)" if shard else ""
  print(f"eval: {len(mine) - len(todo)} of {len(mine)} unit(s) already done, skipped; {len(todo)} to "
        f"compute{where}", file=stream)
  log.event({"event": "start", "units": len(mine), "skipped": len(mine) - len(todo), "to_compute": len(todo),
             "shard": list(shard) if shard else None})
  bar = (tqdm(total=len(todo), desc="eval units", unit="unit", file=stream)
         if progress and primary and todo else None)
  if partitioner is not None and todo:  # the backbone goes on the mesh once, not once per unit
    backbone_specs, _ = loaded.model.expert_specs()
    loaded = dataclasses.replace(loaded, backbone=partitioner.place(loaded.backbone, backbone_specs))
  try:
    for unit, pending in todo:
      start = time.perf_counter()
      alone = [e for e in pending if e not in routed_by_name]
      parts = [routed_by_name[e].evaluate(loaded, unit.task, rows[unit.task]) for e in pending if e in routed_by_name]
      if alone:
        # A unit of every expert scores the stack as it is (no host copy of it per unit).
        subset = loaded if tuple(alone) == loaded.names else loaded.with_stack(loaded.stack.select(alone))
        parts.insert(0, expert_eval.evaluate_tasks(
            subset, [unit.task], split=options.split, max_examples=options.max_examples,
            batch_size=options.batch_size, expert_chunk=expert_chunk, max_input_length=options.max_input_length,
            max_target_length=options.max_target_length, beam_size=options.beam_size,
            partitioner=partitioner, rows={unit.task: rows[unit.task]})[0])
      result = _joined(parts)
      path = store.write(unit, records[unit.task], expert_digests, result) if primary else ""
      partitioning.barrier(f"elm_jax.eval.unit.{unit.index}")
      log.unit(unit, result, time.perf_counter() - start, path)
      found[unit.task].valid.update((expert, (stored, path)) for expert, stored in _expert_results(result).items())
      found[unit.task].task_facts = _task_facts(result)
      if bar is not None:
        bar.update(1)
  finally:
    log.close()
    if bar is not None:
      bar.close()
  if shard is not None:
    return None
  return [assemble_task(t, found[t], names) for t in tasks]


def _joined(parts: Sequence[TaskResult]) -> TaskResult:
  """One task's results in several columns (experts alone, routed methods) as one TaskResult."""
  first = parts[0]
  metrics = {column: m for part in parts for column, m in part.metrics.items()}
  predictions = [{**record, "predictions": {column: p for part in parts
                                            for column, p in part.predictions[n]["predictions"].items()}}
                 for n, record in enumerate(first.predictions)]
  return dataclasses.replace(first, metrics=metrics, predictions=predictions)


def _check_complete(units: Sequence[Unit], found: dict[str, Found], output_dir: str) -> None:
  """Refuses to assemble when any unit's experts lack a matching result, naming the first such
  unit and why (missing, or made with other inputs)."""
  for unit in units:
    missing = [e for e in unit.experts if e not in found[unit.task].valid]
    if not missing:
      continue
    stale = [found[unit.task].stale[e] for e in missing if e in found[unit.task].stale]
    if stale:
      raise SweepError(f"{unit.describe()}: {stale[0]}; rerun its shard with today's inputs")
    raise SweepError(f"{unit.describe()} is missing from {os.path.join(output_dir, UNITS_DIR)} "
                     f"(experts {', '.join(missing[:5])}); it is computed by --shard=i/N with "
                     f"i = {unit.index} mod N")
