"""The ELM task inventory: 296 prompt experts, 36 dataset experts, the held-out suite, BIG-bench,
continual and compositional tasks, as shipped in tasks/elm_inventory.json (made by
tools/make_task_inventory.py from the paper's public configs). Reading it needs no data.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Optional

from elm_jax.errors import UserInputError

INVENTORY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elm_inventory.json")

PROMPT_EXPERTS_MIXTURE = "elm_prompt_experts"
HELD_OUT_MIXTURE = "t0_eval_score"
BIGBENCH_MIXTURE = "bigbench_13"
CONTINUAL_MIXTURE = "continual_8"


@functools.lru_cache(maxsize=1)
def load_inventory() -> dict[str, Any]:
  with open(INVENTORY_PATH, encoding="utf-8") as f:
    return json.load(f)


def p3_task_name(dataset: str, subset: Optional[str], prompt: str) -> str:
  """P3's subset naming: dataset[_subset]_prompt, every run of other characters -> '_'.

  The inventory already folds some subsets into the dataset name (`glue_mrpc` / `mrpc`).
  """
  has_subset = subset and subset != "none" and not dataset.endswith(f"_{subset}")
  name = dataset + (f"_{subset}_" if has_subset else "_") + prompt
  return re.sub(r"[^\w\d\._]+", "_", name)


def held_out_task_name(entry: dict[str, Any]) -> str:
  """Held-out prompt -> its P3 `_score_eval` subset name. ANLI puts the round after the prompt
  (`anli_can_we_infer_r1_score_eval`); story_cloze is P3's `story_cloze_2016`."""
  dataset, subset, prompt = entry["dataset"], entry["subset"], entry["prompt"]
  match = re.fullmatch(r"anli_(r\d)", dataset)
  if match:
    return p3_task_name("anli", None, f"{prompt}_{match.group(1)}") + "_score_eval"
  if dataset == "story_cloze":
    subset = "2016"
  return p3_task_name(dataset, subset, prompt) + "_score_eval"


def mixtures() -> dict[str, list[str]]:
  """Mixture name -> member task names, for every mixture the inventory defines."""
  inv = load_inventory()
  out = {PROMPT_EXPERTS_MIXTURE: [p["name"] for p in inv["prompt_experts"]]}
  for de in inv["dataset_experts"]:
    out[f"{de['name']}_all_prompts"] = list(de["prompt_experts"])
  out[HELD_OUT_MIXTURE] = [held_out_task_name(h) for h in inv["held_out"] if h["original_task"]]
  out[BIGBENCH_MIXTURE] = [
      f"bigbench_{b['task']}" + (f"_{s}" if s else "")
      for b in inv["bigbench"] for s in (b["subtasks"] or [""])]
  out[CONTINUAL_MIXTURE] = [c["task"] for c in inv["continual"]]
  return out


def expert_group(kind: str, group: int, group_size: int) -> list[str]:
  """The `group`-th block of `group_size` experts to train together (vmapped): kind 'prompt'
  (the 296 prompt experts, as SeqIO task names) or 'dataset' (the 36 `<dataset>_all_prompts`
  mixtures), in inventory order. The last group may be smaller."""
  inv = load_inventory()
  if kind == "prompt":
    names = [p["name"] for p in inv["prompt_experts"]]
  elif kind == "dataset":
    names = [f"{d['name']}_all_prompts" for d in inv["dataset_experts"]]
  else:
    raise UserInputError(f"expert_group.kind: expected 'prompt' or 'dataset', got {kind!r}")
  groups = -(-len(names) // group_size) if group_size > 0 else 0
  if group_size < 1 or not 0 <= group < groups:
    raise UserInputError(f"expert_group: group {group} of size {group_size}; the {len(names)} {kind} "
                         f"experts make groups 0..{groups - 1}")
  return names[group * group_size:(group + 1) * group_size]


def continual_tasks() -> list[str]:
  """The 8 continual-learning tasks' SeqIO names (the `continual_8` mixture's members)."""
  return list(mixtures()[CONTINUAL_MIXTURE])
