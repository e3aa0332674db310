"""The ELM task inventory: 296 prompt experts, 36 dataset experts, the held-out suite, BIG-bench,
continual and compositional tasks, as shipped in tasks/elm_inventory.json (made by
tools/make_task_inventory.py from the paper's public configs). Reading it needs no data. The
experts' training plans are `elm_jax.training.plans`; the 10 continual experts (the inventory's
8 continual tasks, gigaword as 3) are `tasks.continual.CONTINUAL_EXPERTS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Optional

from elm_jax.errors import UserInputError

INVENTORY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elm_inventory.json")

PROMPT_EXPERTS_MIXTURE = "elm_prompt_experts"
CONTINUAL_MIXTURE = "continual_10"
HELD_OUT_MIXTURE = "t0_eval_score"
BIGBENCH_MIXTURE = "bigbench_13"


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
  out[BIGBENCH_MIXTURE] = [f"bigbench_{b['task']}_score_eval" for b in inv["bigbench"]]
  return out


@dataclasses.dataclass(frozen=True)
class ContinualExpert:
  """One continual-learning expert of the paper (ELM_NOTES §2.3): `task` is the inventory's
  row it expands, `prompt` its training prompt, `metric` the one the authors' tables report for
  it and `metric_here` the one `elm-jax eval` reports (BERTScore needs microsoft/deberta-large-mnli,
  which cannot be shipped: ROUGE-L stands in for it)."""
  name: str
  task: str
  dataset: str
  prompt: str
  batch_size: int
  epochs: int
  metric: str
  metric_here: str
  max_samples: int = 100_000


def _expert(task, dataset, prompt, batch, epochs, metric):
  here = {"BLEU": "bleu", "ROUGE-1": "rouge1", "BERTScore": "rougeL"}[metric]
  name = "ct0_" + "".join(c if c.isalnum() else "_" for c in f"{dataset}_{prompt}").strip("_")
  return ContinualExpert(name, task, dataset, prompt, batch, epochs, metric, here)


# The 8 cT0 tasks as 10 experts: gigaword with constraints is trained as 3 (one per constraint).
CONTINUAL_EXPERTS = (
    _expert("wiki_auto (simplification)", "wiki_auto", "simplification_1", 2, 1, "BLEU"),
    *[_expert("gigaword with constraints", "gigaword", f"constrain_{c}+make_a_title", 8, 1, "ROUGE-1")
      for c in ("contain", "end", "start")],
    _expert("haiku", "haiku", "do_nothing", 8, 10, "ROUGE-1"),
    _expert("covid_qa", "covid_qa", "covid_qa_deepset", 8, 50, "BERTScore"),
    _expert("eli5", "eli5", "generate_a_question_1", 4, 2, "BERTScore"),
    _expert("empathetic_dialogues", "empathetic_dialogues", "dialogue_with_emotion", 4, 2, "BERTScore"),
    _expert("esnli", "esnli", "explain_why", 8, 1, "BERTScore"),
    _expert("twitter_top20", "twitter_top20", "tweet_as+about", 8, 8, "BERTScore"),
)
