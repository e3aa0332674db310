"""The ELM task inventory: 296 prompt experts, 36 dataset experts, the held-out suite, BIG-bench,
continual and compositional tasks, as shipped in tasks/elm_inventory.json (made by
tools/make_task_inventory.py from the paper's public configs). Reading it needs no data.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

INVENTORY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elm_inventory.json")

PROMPT_EXPERTS_MIXTURE = "elm_prompt_experts"
HELD_OUT_MIXTURE = "t0_eval_score"
BIGBENCH_MIXTURE = "bigbench_13"
CONTINUAL_MIXTURE = "continual_8"


@functools.lru_cache(maxsize=1)
def load_inventory() -> dict[str, Any]:
  with open(INVENTORY_PATH, encoding="utf-8") as f:
    return json.load(f)


def held_out_task_name(entry: dict[str, Any]) -> str:
  """Held-out prompt -> its P3-style `_score_eval` task name (dataset_prompt_score_eval)."""
  import re
  return re.sub(r"[^\w\d\._]+", "_", f"{entry['dataset']}_{entry['prompt']}") + "_score_eval"


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
