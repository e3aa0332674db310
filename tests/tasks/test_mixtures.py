"""The ELM mixtures over a tiny P3 copy: budgets, T0 rates, the held-out rank-classification suite."""

import json
import os

import pytest
import seqio

from tasks import inventory, mixtures
from tests.helpers.p3_data import SCORE_FEATURES, TRAIN_FEATURES, make_examples, write_subset


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("p3_mix"))
  inv = inventory.load_inventory()
  cosmos = [p["name"] for p in inv["prompt_experts"] if p["dataset"] == "cosmos_qa"][:2]
  for name in cosmos:
    write_subset(root, name, "train", TRAIN_FEATURES, make_examples(12), shards=1)
  # Pretend the second prompt's dataset is "too large" for T0's cap: its stats say 600,000.
  with open(os.path.join(root, cosmos[1], "stats.train.json"), "w") as f:
    json.dump({"examples": 600_000}, f)
  cb = "super_glue_cb_can_we_infer_score_eval"
  write_subset(root, cb, "validation", SCORE_FEATURES, make_examples(6, score=True), shards=1)
  return root, mixtures.register_elm_tasks(data_dir=root), cosmos, cb


def test_everything_is_registered_without_data(registered):
  _, reg, _, _ = registered
  assert len(reg) == 36 + 2
  assert len(reg["t0_train"]) == 296 and len(reg[inventory.HELD_OUT_MIXTURE]) == 113
  assert len([n for n in seqio.TaskRegistry.names() if n.startswith("elm_pe_")]) == 296
  assert seqio.MixtureRegistry.get("cosmos_qa_all_prompts")


def test_prompt_expert_task_respects_its_budget(registered):
  _, _, cosmos, _ = registered
  task = seqio.TaskRegistry.get(f"elm_pe_{cosmos[0]}")
  # Budget of cosmos_qa prompt experts is 50k: all 12 examples, shuffled deterministically.
  a = [e["inputs_pretokenized"] for e in task.get_dataset(split="train", shuffle=False).as_numpy_iterator()]
  b = [e["inputs_pretokenized"] for e in task.get_dataset(split="train", shuffle=False).as_numpy_iterator()]
  assert len(a) == 12 and a == b
  budgeted = mixtures._take_budget(5)(seqio.TaskRegistry.get(cosmos[0]).get_dataset(split="train", shuffle=False))
  assert len(list(budgeted)) == 5


def test_t0_rates_follow_t0s_cap(registered):
  root, _, cosmos, _ = registered
  mixture = seqio.MixtureRegistry.get("t0_train")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks if t.name in cosmos}
  assert rates[cosmos[0]] == 12  # under the cap: its example count
  assert rates[cosmos[1]] == 500_000 // 13  # over the cap: 500k / cosmos_qa's 13 prompts


def test_held_out_task_scores_with_rank_classification(registered):
  _, _, _, cb = registered
  task = seqio.TaskRegistry.get(cb)
  rows = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
  targets = [task.postprocess_fn(None, example=r, is_target=True) for r in rows]
  scores = [0.0 if t[1] else -1.0 for t in targets]  # an oracle scorer
  metric = task.score_metric_fns[0](targets, scores)
  assert metric["accuracy"] == 100.0 and metric["examples"] == 3


def test_mixture_naming_an_unknown_task():
  with pytest.raises(mixtures.MixtureError, match=r"my.gin: mixture 'mine' names unregistered task\(s\) \['no_such_task'\]"):
    mixtures.add_mixture("mine", ["no_such_task"], source="my.gin")
