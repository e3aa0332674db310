"""The ELM task inventory and `elm-jax tasks list`, with no data present."""

import collections

from elm_jax.commands import cli
from tasks import inventory


def test_counts_match_the_paper():
  inv = inventory.load_inventory()
  experts = inv["prompt_experts"]
  assert len(experts) == 296 and len({p["name"] for p in experts}) == 296
  per_dataset = collections.Counter(p["dataset"] for p in experts)
  assert len(per_dataset) == 36
  # Spot checks against ELM_NOTES §1.7.
  assert per_dataset["cosmos_qa"] == 13 and per_dataset["trec"] == 18 and per_dataset["wiki_bio"] == 1
  assert per_dataset["paws"] == 12 and per_dataset["glue_mrpc"] == 7
  held = [h for h in inv["held_out"] if h["original_task"]]
  assert len(inv["held_out"]) == 120 and len(held) == 113
  assert len({h["dataset"] for h in held}) == 11
  assert len(inv["bigbench"]) == 13 and len(inv["continual"]) == 8


def test_p3_style_names():
  names = {p["name"] for p in inventory.load_inventory()["prompt_experts"]}
  assert "adversarial_qa_adversarialQA_based_on" in names
  assert "glue_mrpc_equivalent" in names
  assert "cosmos_qa_context_answer_to_question" in names
  assert all(" " not in n and "/" not in n for n in names)


def test_mixtures():
  mixtures = inventory.mixtures()
  assert len([m for m in mixtures if m.endswith("_all_prompts")]) == 36
  assert len(mixtures["cosmos_qa_all_prompts"]) == 13
  assert len(mixtures[inventory.HELD_OUT_MIXTURE]) == 113
  assert "super_glue_cb_can_we_infer_score_eval" in mixtures[inventory.HELD_OUT_MIXTURE]
  assert len(mixtures[inventory.BIGBENCH_MIXTURE]) == 13
  assert "bigbench_logical_deduction_score_eval" in mixtures[inventory.BIGBENCH_MIXTURE]


def test_tasks_list_command(capsys):
  assert cli.main(["tasks", "list"]) == 0
  out = capsys.readouterr().out
  assert "Prompt experts (296 tasks over 36 datasets" in out
  assert out.count("_all_prompts  (") == 36
  assert "t0_eval_score (11 datasets, 113 original-task prompts" in out
  assert cli.main(["tasks", "list", "--mixture=cosmos_qa_all_prompts"]) == 0
  assert len(capsys.readouterr().out.split()) == 13
  assert cli.main(["tasks", "list", "--mixture=nope"]) == 2
  assert "--mixture=nope: unknown mixture" in capsys.readouterr().err
