"""BIG-bench JSON tasks, formatted as ELM formats them for rank classification.

A task file holds `name`, an optional `task_prefix` and `examples`, each
`{"input": str, "target_scores": {choice: score}}` (multiple choice) or
`{"input": str, "target": str | [str]}` (generative).

The prompt follows ELM (`ELM_NOTES.md` §2.2 and `elm_reference.json["bigbench_format"]`):
  task_prefix + "\\nQ: " + input + "".join("\\n choice: " + c for c in choices) + "\\nA: "
with choices = the keys of `target_scores` in file order and the correct choice = the first
key with the maximum score. These are BIG-bench's default prefixes; ELM hard-codes them, so a
file's own `example_input_prefix` / `choice_prefix` / `example_output_prefix` are ignored, and
choices are never shuffled.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from elm_jax.errors import UserInputError
from tasks import rank_classification

INPUT_PREFIX = "\nQ: "
CHOICE_PREFIX = "\n choice: "
OUTPUT_PREFIX = "\nA: "


class BigBenchError(UserInputError):
  """A BIG-bench task file that is missing a field or has one of the wrong type."""


@dataclasses.dataclass(frozen=True)
class BigBenchExample:
  """One example: `target_scores` (choice -> score, file order) or generative `targets`."""
  index: int
  input: str
  target_scores: Optional[dict[str, float]] = None
  targets: Optional[list[str]] = None


@dataclasses.dataclass(frozen=True)
class BigBenchTask:
  """A parsed task file; `source` is its path (named in errors)."""
  name: str
  task_prefix: str
  examples: list[BigBenchExample]
  source: str


def _example(path: str, index: int, raw: Any) -> BigBenchExample:
  """One raw JSON example -> BigBenchExample, checking `input` and `target_scores`/`target`."""
  where = f"{path}: example {index}"
  if not isinstance(raw, dict):
    raise BigBenchError(f"{where}: expected an object, got {type(raw).__name__}")
  if not isinstance(raw.get("input"), str):
    raise BigBenchError(f"{where}: field 'input': expected a string, got {raw.get('input')!r}")
  scores = raw.get("target_scores")
  if scores is not None:
    if not isinstance(scores, dict) or not scores:
      raise BigBenchError(f"{where}: field 'target_scores': expected a non-empty object "
                          f"choice -> score, got {scores!r}")
    bad = {k: v for k, v in scores.items()
           if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
      raise BigBenchError(f"{where}: field 'target_scores': scores must be numbers, got {bad!r}")
    scores = {str(k): float(v) for k, v in scores.items()}
  target = raw.get("target")
  targets = None
  if target is not None:
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
      raise BigBenchError(f"{where}: field 'target': expected a string or a list of strings, "
                          f"got {target!r}")
  if scores is None and targets is None:
    raise BigBenchError(f"{where}: field 'target_scores': missing (and no generative 'target')")
  return BigBenchExample(index=index, input=raw["input"], target_scores=scores, targets=targets)


def load_bigbench_task(path: str) -> BigBenchTask:
  """A BIG-bench `task.json` -> BigBenchTask; missing or mistyped fields name file/example/field."""
  path = str(path)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except OSError as e:
    raise BigBenchError(f"{path}: cannot read BIG-bench task file: {e}") from e
  except json.JSONDecodeError as e:
    raise BigBenchError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise BigBenchError(f"{path}: expected a JSON object with field 'examples'")
  examples = raw.get("examples")
  if not isinstance(examples, list) or not examples:
    raise BigBenchError(f"{path}: field 'examples': expected a non-empty list, got "
                        f"{'nothing' if examples is None else repr(examples)[:80]}")
  prefix = raw.get("task_prefix", "")
  if not isinstance(prefix, str):
    raise BigBenchError(f"{path}: field 'task_prefix': expected a string, got {prefix!r}")
  name = raw.get("name", "")
  return BigBenchTask(name=str(name), task_prefix=prefix, source=path,
                      examples=[_example(path, i, e) for i, e in enumerate(examples)])


def format_inputs(task: BigBenchTask, example: BigBenchExample) -> str:
  """ELM's prompt: prefix + '\\nQ: ' + input + one '\\n choice: c' per choice + '\\nA: '."""
  choices = list(example.target_scores or {})
  return (task.task_prefix + INPUT_PREFIX + example.input
          + "".join(CHOICE_PREFIX + c for c in choices) + OUTPUT_PREFIX)


def format_example(task: BigBenchTask, example: BigBenchExample) -> tuple[str, list[str], int]:
  """(inputs, choices, correct index) for a multiple-choice example.

  choices = keys of `target_scores` in file order; correct = first index of the max score.
  """
  if example.target_scores is None:
    raise BigBenchError(f"{task.source}: example {example.index}: field 'target_scores': "
                        "missing; a generative example cannot be rank-classified")
  choices = list(example.target_scores)
  scores = list(example.target_scores.values())
  correct = scores.index(max(scores))
  return format_inputs(task, example), choices, correct


def rank_rows(task: BigBenchTask, mode: str = "eval") -> list[dict[str, Any]]:
  """Rank-classification rows of every example (an example with < 2 choices is an error)."""
  return rank_classification.rows_from_examples(
      (format_example(task, e) for e in task.examples), mode=mode, source=task.source)
