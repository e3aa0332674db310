"""The ELM task inventory: 296 prompt experts, 36 dataset experts, the held-out suite, BIG-bench,
continual and compositional tasks, as shipped in tasks/elm_inventory.json (made by
tools/make_task_inventory.py from the paper's public configs). Reading it needs no data. The
experts' training plans are `elm_jax.training.plans`; the 10 continual experts (the inventory's
8 continual tasks, gigaword as 3) are `CONTINUAL_EXPERTS`, the paper's 16 continual evaluation
prompts `CONTINUAL_EVAL`. `train_sample` says which rows of a split an expert of a dataset
trains on, as the paper's code takes them (or as its configs state them).
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
CONTINUAL_EVAL_MIXTURE = "continual_eval_16"
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


# The task classes of the paper's code whose `AbstractTask.get` ignores `max_train_samples` and
# returns the class's own slice of the train split in file order (ELM_NOTES §1.5, correction;
# elm_reference.json `official_code_whole_slice`): dataset -> rows of the slice (None: all).
WHOLE_SLICE = {"wiki_hop": 50_000, "amazon_polarity": 50_000, "yelp_review_full": 50_000,
               "dbpedia_14": 50_000, "imdb": 50_000, "app_reviews": 50_000, "gigaword": 10_000,
               "trec": None, "rotten_tomatoes": None, "wiki_auto": None}
# A class that slices its split (the first 10,000 rows) and then draws `max_train_samples` from
# that slice with the seed-42 permutation (ELM_NOTES §1.5).
SLICE_THEN_DRAW = {"multi_news": 10_000}
# What the recipes' budgets follow: 'code' (the paper's code, which produced its numbers) or
# 'configs' (the configs' `max_train_samples`, first rows for the classes that slice).
SAMPLING_FOLLOWS = ("code", "configs")
_CONFIG_FIRST_ROWS = {"wiki_hop", "amazon_polarity", "yelp_review_full", "dbpedia_14", "imdb", "gigaword",
                      "multi_news"}


@dataclasses.dataclass(frozen=True)
class TrainSample:
  """Which rows of a train split an expert trains on (per prompt): `samples` rows (None: every
  row of the population), drawn as `sampling` says: 'first' (the first `samples` rows, in file
  order), 'all' (the whole population) or 'permutation' (the first `samples` of a seed-42
  permutation of the population). The population is the first `drawn_from` rows of the split
  (None: the whole split)."""
  samples: Optional[int]
  sampling: str
  drawn_from: Optional[int] = None

  def rows(self, split_rows: int) -> int:
    """How many rows of a split of `split_rows` rows the expert trains on."""
    n = split_rows if self.drawn_from is None else min(split_rows, self.drawn_from)
    return n if self.samples is None else min(self.samples, n)


def train_sample(dataset: str, budget: Optional[int], follows: str = "code") -> TrainSample:
  """The rows an expert of `dataset` with its config's `max_train_samples` = `budget` (None:
  the whole split) trains on. follows='code' (default): the ten `WHOLE_SLICE` classes take
  their slice whatever the budget (first rows, or all), multi_news a seed-42 draw of `budget`
  from its first 10,000 rows, every other dataset a seed-42 draw of `budget` from the whole
  split. follows='configs': the budget, as the first rows for the classes that slice, else a
  seed-42 draw."""
  if follows not in SAMPLING_FOLLOWS:
    raise UserInputError(f"sampling_follows: expected one of {list(SAMPLING_FOLLOWS)}, got {follows!r}")
  if follows == "code" and dataset in WHOLE_SLICE:
    size = WHOLE_SLICE[dataset]
    return TrainSample(None, "all") if size is None else TrainSample(size, "first")
  if budget is None:
    return TrainSample(None, "all")
  if follows == "code" and dataset in SLICE_THEN_DRAW:
    return TrainSample(budget, "permutation", SLICE_THEN_DRAW[dataset])
  return TrainSample(budget, "first" if dataset in _CONFIG_FIRST_ROWS else "permutation")


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
_by_prompt = {e.prompt: e.name for e in CONTINUAL_EXPERTS if e.dataset == "gigaword"}


@dataclasses.dataclass(frozen=True)
class ContinualEvalPrompt:
  """One of the paper's 16 continual evaluation prompts (`cT0_eval.json`; ELM_NOTES §2.3): its
  task name, the expert whose validation file it reads (None: its own directory), the metric
  the authors' tables report and the one `elm-jax eval` reports (`ContinualExpert`)."""
  name: str
  dataset: str
  prompt: str
  metric: str
  metric_here: str
  expert: Optional[str] = None


def _eval_prompt(dataset, prompt, metric, expert=None):
  here = {"BLEU": "bleu", "ROUGE-1": "rouge1", "BERTScore": "rougeL"}[metric]
  name = "ct0_eval_" + "".join(c if c.isalnum() else "_" for c in f"{dataset}_{prompt}").strip("_")
  return ContinualEvalPrompt(name, dataset, prompt, metric, here, expert)


# The 16: the 10 experts' own prompts (read from their validation files) and wiki_auto's
# simplification_2, asset's simplification_1/2 and gigaword's 3 write_its_sentence prompts.
CONTINUAL_EVAL = tuple(
    [_eval_prompt(e.dataset, e.prompt, e.metric, e.name) for e in CONTINUAL_EXPERTS[:1]]
    + [_eval_prompt("wiki_auto", "simplification_2", "BLEU")]
    + [_eval_prompt("asset", f"simplification_{i}", "BLEU") for i in (1, 2)]
    + [_eval_prompt("gigaword", f"constrain_{c}+{p}", "ROUGE-1", _by_prompt.get(f"constrain_{c}+{p}"))
       for c in ("contain", "end", "start") for p in ("make_a_title", "write_its_sentence")]
    + [_eval_prompt(e.dataset, e.prompt, e.metric, e.name) for e in CONTINUAL_EXPERTS[4:]])


def continual_metrics() -> dict[str, str]:
  """Task name -> the metric `elm-jax eval` reports for it, for every continual expert's task and
  every continual evaluation prompt."""
  out = {e.name: e.metric_here for e in CONTINUAL_EXPERTS}
  out.update({p.name: p.metric_here for p in CONTINUAL_EVAL})
  return out
