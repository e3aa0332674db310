"""Evaluating every selected expert on every (dataset, prompt) of a task or mixture at once.

Tasks with answer choices are rank-classified by `score_all_experts` (one vmapped pass per
batch); tasks without are decoded by every expert at once (`expert_decoding.decode_texts`) and
scored with ROUGE-1/2/L, BLEU and exact match. Results are summarised per dataset as the mean
and median over its prompts (the ELM paper reports means, T0 medians).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import seqio

from elm_jax import defaults, files
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_decoding, generation_metrics, rank_scoring
from elm_jax.expert_stack import ExpertsOnBackbone
from tasks import builtin_suite, instances, inventory


@dataclasses.dataclass
class TaskResult:
  task: str
  dataset: str
  prompt: str
  evaluation: str                             # "rank" (classification) or "generation"
  examples: int
  metrics: dict[str, dict[str, float]]        # expert -> metric -> value (%)
  predictions: list[dict[str, Any]]           # one record per example

  @property
  def primary(self) -> str:
    """The metric reported for the task: accuracy for rank classification; for generation the
    paper's metric of a continual task where we can compute it (BLEU, ROUGE-1; BERTScore needs
    microsoft/deberta-large-mnli, which is not shipped, so ROUGE-L stands in), else ROUGE-L."""
    if self.evaluation == "rank":
      return "accuracy"
    return _CONTINUAL_METRICS.get(self.task, "rougeL")


_CONTINUAL_METRICS = inventory.continual_metrics()  # the 10 experts' tasks and the 16 eval prompts


@functools.lru_cache(maxsize=1)
def _known_prompts() -> dict[str, tuple[str, str]]:
  known = {}
  for spec in builtin_suite.SUITE:
    name = builtin_suite.task_name(spec.dataset, spec.prompt)
    known[name] = known[name + "_score_eval"] = (spec.dataset, spec.prompt)
  inv = inventory.load_inventory()
  for entry in inv["prompt_experts"]:
    known[entry["name"]] = (entry["dataset"] + (f"/{entry['subset']}" if entry["subset"] else ""), entry["prompt"])
  for entry in inv["held_out"]:
    known[inventory.held_out_task_name(entry)] = (
        entry["dataset"] + (f"/{entry['subset']}" if entry["subset"] else ""), entry["prompt"])
  for expert in inventory.CONTINUAL_EXPERTS:
    known[expert.name] = (expert.dataset, expert.prompt)
  for prompt in inventory.CONTINUAL_EVAL:
    known[prompt.name] = (prompt.dataset, prompt.prompt)
  for entry in inv["bigbench"]:  # the paper's 13 tasks, each one "prompt" of its own
    known[f"bigbench_{entry['task']}"] = known[f"bigbench_{entry['task']}_score_eval"] = (
        f"bigbench/{entry['task']}", "bigbench format")
  return known


def dataset_and_prompt(task: str) -> tuple[str, str]:
  """(dataset, prompt) of a task name from the built-in suite or the ELM inventory; otherwise
  the task is its own dataset with one prompt."""
  return _known_prompts().get(task, (task, task))


def member_tasks(name: str) -> list[str]:
  if name in seqio.MixtureRegistry.names():
    return [t.name for t in seqio.MixtureRegistry.get(name).tasks]
  if name not in seqio.TaskRegistry.names():
    raise UserInputError(f"--task: {name!r} is not a registered task or mixture; register it with "
                         "--setup (builtin, elm, module:function)")
  return [name]


def evaluate_task(loaded: ExpertsOnBackbone, task: str, *, split: str = "validation",
                  max_examples: Optional[int] = defaults.MAX_EXAMPLES, batch_size: int = defaults.BATCH_SIZE,
                  expert_chunk: Optional[int] = None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                  max_target_length: int = defaults.MAX_TARGET_LENGTH,
                  beam_size: int = 1, partitioner=None) -> TaskResult:
  """Every loaded expert on up to `max_examples` examples of `task`."""
  return evaluate_tasks(loaded, [task], split=split, max_examples=max_examples, batch_size=batch_size,
                        expert_chunk=expert_chunk, max_input_length=max_input_length,
                        max_target_length=max_target_length, beam_size=beam_size, partitioner=partitioner)[0]


def read_task_rows(task: str, split: str = "validation",
                   max_examples: Optional[int] = defaults.MAX_EXAMPLES) -> list[dict[str, Any]]:
  """Up to `max_examples` instances of `task`'s `split`, checked to be evaluable: answer choices
  with a label (rank classification) or a target text (generation)."""
  if max_examples is not None and max_examples < 1:
    raise UserInputError(f"max_examples: expected a positive integer or None (all), got {max_examples}")
  rows = instances.task_instances(task, split, max_examples)
  if not rows:
    raise UserInputError(f"task {task!r} ({split}): the split holds no examples")
  if not is_ranked(rows) and any(r.get("targets") is None for r in rows):
    raise UserInputError(f"task {task!r} ({split}): examples carry neither answer choices with a "
                         "label nor a target text, so there is nothing to evaluate against")
  return rows


def is_ranked(rows: Sequence[dict[str, Any]]) -> bool:
  """Whether a task's rows are evaluated by rank classification (every row has answer choices
  and a label) rather than by decoding."""
  return bool(rows) and all(r.get("answer_choices") and r.get("label") is not None for r in rows)


def evaluate_tasks(loaded: ExpertsOnBackbone, tasks: Sequence[str], *, split: str = "validation",
                   max_examples: Optional[int] = defaults.MAX_EXAMPLES, batch_size: int = defaults.BATCH_SIZE,
                   expert_chunk: Optional[int] = None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                   max_target_length: int = defaults.MAX_TARGET_LENGTH,
                   max_decode_length: Optional[int] = None, beam_size: int = 1,
                   partitioner=None, rows: Optional[dict[str, list]] = None) -> list[TaskResult]:
  """`evaluate_task` for each of `tasks` (results in that order). The examples of every
  rank-classification task are scored in one pass: batches are sorted by length across tasks
  (fewer, fuller batches and fewer shapes to compile, compiled in parallel), and each chunk of
  experts is moved to the device(s) once (split over the mesh's `expert` axis with a
  `partitioner`). `max_target_length` bounds choices; generation decodes `max_decode_length`
  tokens (default: `max_target_length`). `rows`: each task's instances when already read
  (`read_task_rows`)."""
  rows = dict(rows or {})
  for task in tasks:
    if task not in rows:
      rows[task] = read_task_rows(task, split, max_examples)
  ranked = [t for t in tasks if is_ranked(rows[t])]
  results: dict[str, TaskResult] = {}
  if ranked:
    scores, _ = score_instances(loaded, [r for t in ranked for r in rows[t]], batch_size=batch_size,
                                expert_chunk=expert_chunk, partitioner=partitioner,
                                max_input_length=max_input_length,
                                max_target_length=max_target_length, source=f"task {ranked[0]}"
                                if len(ranked) == 1 else f"tasks {', '.join(ranked)}")
    offset = 0
    for task in ranked:
      n = len(rows[task])
      results[task] = _rank_result(loaded, task, rows[task], scores[:, offset:offset + n])
      offset += n
  for task in tasks:
    if task not in results:
      results[task] = _generation_result(
          loaded, task, rows[task], batch_size=batch_size, expert_chunk=expert_chunk,
          max_input_length=max_input_length, max_decode_length=max_decode_length or max_target_length,
          beam_size=beam_size, partitioner=partitioner)
  return [results[t] for t in tasks]


def _rank_result(loaded: ExpertsOnBackbone, task: str, rows, scores: np.ndarray) -> TaskResult:
  """scores [E, N, C]: every expert's choice log-likelihoods for the task's N examples."""
  dataset, prompt = dataset_and_prompt(task)
  predicted = np.argmax(scores, axis=-1)                      # [E, N]
  labels = np.array([r["label"] for r in rows])
  metrics = {name: {"accuracy": float(100.0 * np.mean(predicted[e] == labels))}
             for e, name in enumerate(loaded.names)}
  predictions = [{"index": n, "label": int(labels[n]),
                  "predictions": {name: int(predicted[e, n]) for e, name in enumerate(loaded.names)}}
                 for n in range(len(rows))]
  return TaskResult(task, dataset, prompt, "rank", len(rows), metrics, predictions)


def _generation_result(loaded: ExpertsOnBackbone, task: str, rows, *, batch_size: int,
                       expert_chunk: Optional[int], max_input_length: int, max_decode_length: int,
                       beam_size: int, partitioner=None) -> TaskResult:
  dataset, prompt = dataset_and_prompt(task)
  texts = expert_decoding.decode_texts(
      loaded, [r["inputs"] for r in rows], batch_size=batch_size, expert_chunk=expert_chunk,
      max_input_length=max_input_length, max_decode_length=max_decode_length, beam_size=beam_size,
      partitioner=partitioner)
  references = [r["targets"] for r in rows]
  metrics = {name: generation_metrics.generation_metrics(texts[e], references)
             for e, name in enumerate(loaded.names)}
  predictions = [{"index": n, "target": references[n],
                  "predictions": {name: texts[e][n] for e, name in enumerate(loaded.names)}}
                 for n in range(len(rows))]
  return TaskResult(task, dataset, prompt, "generation", len(rows), metrics, predictions)


def score_instances(loaded: ExpertsOnBackbone, rows: Sequence[dict[str, Any]], *,
                    batch_size: int = defaults.BATCH_SIZE, expert_chunk: Optional[int] = None,
                    partitioner=None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                    max_target_length: int = defaults.MAX_TARGET_LENGTH, source: str = "instances"):
  """Every expert on every instance's answer choices in one pass: (scores [E, N, C] with
  -inf on padded choices, token counts [N, C]). Instances without choices are an error.
  Each expert reads inputs cut at its own training source length (at most `max_input_length`,
  EOS kept, as the paper's evaluation cuts them): experts of one length share a pass."""
  examples = rank_examples(loaded.vocabulary(), rows, source)
  groups = loaded.input_length_groups(max_input_length)
  scores = counts = None
  for length, positions in groups:
    group = loaded if len(groups) == 1 else loaded.with_stack(
        loaded.stack.select([loaded.names[i] for i in positions]))
    group_scores, counts, scorer = rank_scoring.score_all_experts(
        group.model, group.backbone, group.stack.params, examples, batch_size=batch_size,
        expert_chunk=expert_chunk, partitioner=partitioner, max_input_length=length,
        max_target_length=max_target_length)
    scorer.truncated.report(length, max_target_length)
    if len(groups) == 1:
      return group_scores, counts
    if scores is None:
      scores = np.full((len(loaded.names),) + group_scores.shape[1:], -np.inf, np.float32)
    scores[positions] = group_scores
  return scores, counts


def rank_examples(vocabulary, rows: Sequence[dict[str, Any]], source: str = "instances") -> list[rank_scoring.Example]:
  """Instances ({"inputs", "answer_choices", ...}) tokenized by `vocabulary` for rank scoring,
  in order; an instance without choices is an error naming `source`."""
  examples = []
  for i, row in enumerate(rows):
    if not row.get("answer_choices"):
      raise UserInputError(f"{source}: instance {i} has no answer choices; rank scoring needs them "
                           "(generative tasks are evaluated by decoding)")
    examples.append(rank_scoring.Example(vocabulary.encode(row["inputs"]),
                                         vocabulary.encode_batch(row["answer_choices"])))
  return examples


# ---------------------------------------------------------------------------- reports
def summarize(results: Sequence[TaskResult], experts: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
  """expert -> dataset -> {"mean", "median", "prompts"} of each task's primary metric."""
  out: dict[str, dict[str, dict[str, float]]] = {}
  for expert in experts:
    per_dataset: dict[str, list[float]] = {}
    for r in results:
      per_dataset.setdefault(r.dataset, []).append(r.metrics[expert][r.primary])
    out[expert] = {d: {"mean": float(np.mean(v)), "median": float(np.median(v)), "prompts": len(v)}
                   for d, v in per_dataset.items()}
  return out


def markdown_table(results: Sequence[TaskResult], experts: Sequence[str]) -> str:
  """Rows: (dataset, prompt, metric) then each dataset's mean and median; columns: experts."""
  header = "| dataset | prompt | metric | " + " | ".join(experts) + " |"
  lines = [header, "|" + "---|" * (3 + len(experts))]
  for r in results:
    lines.append(f"| {r.dataset} | {r.prompt} | {r.primary} | " +
                 " | ".join(f"{r.metrics[e][r.primary]:.1f}" for e in experts) + " |")
  summary = summarize(results, experts)
  for dataset in dict.fromkeys(r.dataset for r in results):
    for stat in ("mean", "median"):
      lines.append(f"| **{dataset}** | {stat} over prompts | | " +
                   " | ".join(f"{summary[e][dataset][stat]:.1f}" for e in experts) + " |")
  return "\n".join(lines) + "\n"


REPORT_FILES = ("results.json", "results.csv", "results.md", "predictions")
# What else a sweep keeps in its output directory (`evaluation/sweep.py`).
SWEEP_FILES = ("units", "log.jsonl", "tensorboard")


def check_output_dir(output_dir: str) -> None:
  """Refuses, before any work, an output directory that is a file, or one holding anything
  `eval` did not write (its reports, its sweep's units, log and TensorBoard files, and the
  temporary names of its atomic writes): a sweep resumes in a directory of its own and never
  deletes anything else."""
  files.check_output_dir(output_dir, "--output_dir")
  if not os.path.isdir(output_dir):
    return
  ours = set(REPORT_FILES) | set(SWEEP_FILES)
  foreign = sorted(n for n in os.listdir(output_dir) if n not in ours and not n.startswith("."))
  if foreign:
    raise UserInputError(f"--output_dir={output_dir}: holds files that `elm-jax eval` did not write "
                         f"({', '.join(foreign[:5])}); not writing into it: choose another directory")


def report_bytes(results: Sequence[TaskResult], experts: Sequence[str], run: dict[str, Any]) -> dict[str, bytes]:
  """results.json, results.csv and results.md as bytes (a function of their inputs alone)."""
  summary = summarize(results, experts)
  report = json.dumps({"run": run, "summary": summary, "tasks": [_task_record(r) for r in results]}, indent=1)
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["task", "dataset", "prompt", "expert", "metric", "value", "examples"])
  for r in results:
    for expert in experts:
      for metric, value in r.metrics[expert].items():
        writer.writerow([r.task, r.dataset, r.prompt, expert, metric, f"{value:.4f}", r.examples])
  return {"results.json": report.encode(), "results.csv": buffer.getvalue().encode(),
          "results.md": markdown_table(results, experts).encode()}


def _task_record(result: TaskResult) -> dict[str, Any]:
  """A task's entry in results.json: its fields but the predictions, the evaluation under the
  key "kind" (the file's since its first version)."""
  return {"task": result.task, "dataset": result.dataset, "prompt": result.prompt, "kind": result.evaluation,
          "examples": result.examples, "metrics": result.metrics}


def write_reports(output_dir: str, results: Sequence[TaskResult], experts: Sequence[str],
                  run: dict[str, Any]) -> None:
  """results.json, results.csv, results.md and predictions/<task>.jsonl in `output_dir`, each
  written under a temporary name and renamed into place (predictions/ as one directory); the
  directory's other files (a sweep's units and logs) stay."""
  output_dir = os.path.abspath(output_dir)
  check_output_dir(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  with files.atomic_directory(os.path.join(output_dir, "predictions"), replace=True) as tmp:
    for r in results:
      with open(os.path.join(tmp, f"{r.task}.jsonl"), "w") as f:
        for record in r.predictions:
          f.write(json.dumps(record) + "\n")
  for name, data in report_bytes(results, experts, run).items():
    files.write_atomically(os.path.join(output_dir, name), data)
