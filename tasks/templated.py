"""SeqIO tasks from raw data rendered through promptsource-format templates, and BIG-bench
files: with promptsource's template folder and the raw datasets, this reproduces P3's subsets.

A templated example becomes {inputs, targets} and, when the template has answer choices,
{answer_choices, label} with label = the index of the target among the choices (T0's
`is_correct = target == choice`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from tasks import bigbench, prompted, raw_sources, templates


def render_rows(rows: list[dict[str, Any]], template: templates.Template, source: str
                ) -> list[dict[str, Any]]:
  """Raw rows -> prompted rows; examples the template leaves without a target are dropped (as
  promptsource does for prompts that do not apply to an example)."""
  out = []
  for i, row in enumerate(rows):
    inputs, target = template.apply(row, index=i)
    if target is None or not inputs:
      continue
    record: dict[str, Any] = {"inputs": inputs, "targets": target}
    choices = template.get_answer_choices(row, index=i)
    if choices:
      if target not in choices:
        raise templates.TemplateError(
            f"{source}: example {i}: template {template.name!r} renders target {target!r}, which is "
            f"not one of its answer_choices {choices}")
      record.update(answer_choices=choices, label=choices.index(target))
    out.append(record)
  return out


def register_templated_task(name: str, template_file: str, template_name: str, vocabulary, *,
                            sources: Mapping[str, str],
                            source_splits: Optional[Mapping[str, str]] = None,
                            data_dir: Optional[str] = None) -> list[str]:
  """Registers `name` (+ `name_score_eval` when the template has answer choices).

  `sources` maps each of our splits to a raw source (a .jsonl/.json/.csv/.tsv path, 'tfds:NAME'
  or 'hf:DIR'; see tasks.raw_sources); `source_splits` renames our split for TFDS/HF sources
  (e.g. {"validation": "validation_matched"}). Nothing is read until a dataset is asked for.
  """
  source_splits = dict(source_splits or {})

  def rows_fn(split: str):
    loaded = templates.load_templates(template_file)
    if template_name not in loaded:
      raise templates.TemplateError(f"{template_file}: no template named {template_name!r}; "
                                    f"it has {sorted(loaded)}")
    source_split = source_splits.get(split, split)
    rows = raw_sources.read_raw(sources[split], split=source_split, data_dir=data_dir)
    return render_rows(rows, loaded[template_name], f"{sources[split]} ({source_split})")

  has_choices = "answer_choices" in _template_fields(template_file, template_name)
  return prompted.register_prompted_task(name, rows_fn, vocabulary, splits=tuple(sources),
                                         score_eval=has_choices, source=template_file)


def _template_fields(template_file: str, template_name: str) -> set[str]:
  """Fields the template defines (read only to know whether a _score_eval twin is needed)."""
  try:
    template = templates.load_templates(template_file).get(template_name)
  except templates.TemplateError:
    return set()
  return {"answer_choices"} if template is not None and template.answer_choices else set()


def _bigbench_rows(path: str) -> list[dict[str, Any]]:
  task = bigbench.load_bigbench_task(path)
  rows = []
  for example in task.examples:
    inputs, choices, correct = bigbench.format_example(task, example)
    rows.append({"inputs": inputs, "targets": choices[correct], "answer_choices": choices, "label": correct})
  return rows


def register_bigbench_task(name: str, path: str, vocabulary) -> list[str]:
  """A BIG-bench JSON task as `name` (text-to-text) and `name_score_eval` (rank classification),
  both on the `validation` split (BIG-bench tasks are evaluation-only here)."""
  return register_bigbench_group(name, [path], vocabulary)


def register_bigbench_group(name: str, paths: list[str], vocabulary) -> list[str]:
  """One task whose examples are those of every task.json in `paths`, in order (a path listed
  twice gives its examples twice): a BIG-bench task with sub-tasks, grouped as the paper's
  `make_benchmarks.py` groups them."""
  def rows_fn(split: str):
    return [row for path in paths for row in _bigbench_rows(path)]
  return prompted.register_prompted_task(name, rows_fn, vocabulary, splits=("validation",),
                                         source=", ".join(dict.fromkeys(paths)))
