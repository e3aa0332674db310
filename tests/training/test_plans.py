"""Every expert of every XL recipe resolves to a plan that matches the paper's configs field by
field, as the project's reference facts state them (elm_reference.json, read here at test time
from ../shared/reference/ when it is beside the checkout, else from the copy that
tools/copy_reference.py keeps in tests/golden/, which must then still equal it)."""

from __future__ import annotations

import collections
import json
import os

import gin
import pytest

from elm_jax.commands import cli, gin_utils
from elm_jax.training import plans
from tasks import inventory, mixtures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, "..", "shared", "reference", "elm_reference.json")
COPY = os.path.join(REPO, "tests", "golden", "elm_reference", "elm_reference.json")


@pytest.fixture(scope="module")
def reference() -> dict:
  copy = json.load(open(COPY))
  if os.path.isfile(SHARED):
    assert json.load(open(SHARED)) == copy, "tests/golden/elm_reference is stale: run tools/copy_reference.py"
  return copy


def _subset(value):
  return None if value in (None, "none") else value


def test_prompt_expert_plans_match_the_papers_configs(reference):
  rows = {(r["dataset"], _subset(r["subset"]), r["prompts"][0]): r for r in reference["prompt_experts"]}
  inv = {p["name"]: p for p in inventory.load_inventory()["prompt_experts"]}
  got = plans.recipe_plans("prompt")
  assert len(got) == len(reference["prompt_experts"]) == 296
  for plan in got:
    row = inv[plan.name]
    ref = rows[(row["dataset"], _subset(row["subset"]), row["prompt"])]
    assert (plan.samples, plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length) == (
        ref["max_train_samples"], ref["batch_size"], ref["epochs"], ref["learning_rate"],
        ref["max_source_length"]), plan.name
    opt = reference["optimizer"]
    assert (plan.optimizer, plan.max_grad_norm, plan.warmup_steps, plan.schedule) == (
        opt["name"].lower(), opt["max_grad_norm"], 0, "linear"), plan.name
    assert (plan.target_length, plan.dropout, plan.seed) == (128, 0.1, 42)
    assert plan.sampling == ("all" if ref["max_train_samples"] is None else
                             "first" if row["dataset"] in plans.FIRST_ROWS else "permutation")
    if ref["max_train_samples"] is not None:  # the budget's steps: epochs x ceil(N / batch)
      assert plan.steps == ref["epochs"] * -(-ref["max_train_samples"] // ref["batch_size"])
    assert plan.data == ("raw+templates" if (row["dataset"], _subset(row["subset"])) in mixtures.NOT_IN_P3
                         else "p3")
  assert sum(p.data == "raw+templates" for p in got) == 16


def test_dataset_expert_plans_match_the_papers_all_configs(reference):
  rows = {(r["dataset"], _subset(r["subset"])): r for r in reference["dataset_experts_adapter"]}
  got = plans.recipe_plans("dataset")
  assert len(got) == 36
  prompt_plans = {p.name: p for p in plans.recipe_plans("prompt")}
  inv = {d["name"]: d for d in inventory.load_inventory()["dataset_experts"]}
  for plan in got:
    row = inv[plan.name]
    ref = rows.get((row["dataset"], _subset(row["subset"])))
    if ref is None:  # wiki_bio: no `*_all` config; one prompt, whose expert's plan it follows
      assert plan.dataset == "wiki_bio" and len(plan.prompts) == 1
      single = prompt_plans[plan.prompts[0]]
      assert (plan.samples, plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length) == (
          single.samples, single.batch_size, single.epochs, single.learning_rate, single.input_length)
      continue
    assert (plan.samples, plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length) == (
        ref["max_train_samples"], ref["batch_size"], ref["epochs"], ref["learning_rate"],
        ref["max_source_length"]), plan.name
    assert len(plan.prompts) == len(ref["prompts"])


def test_continual_expert_plans_expand_the_papers_tasks(reference):
  got = plans.recipe_plans("continual")
  assert len(got) == 10
  by_task = collections.defaultdict(list)
  for plan, expert in zip(got, inventory.CONTINUAL_EXPERTS):
    by_task[expert.task].append((plan, expert))
  assert [r["task"] for r in reference["continual_tasks"]] == list(by_task)
  for ref in reference["continual_tasks"]:
    experts = by_task[ref["task"]]
    prompts = [expert.prompt for _, expert in experts]
    if "(3 experts)" in ref["train_prompt"]:  # "constrain_{contain,end,start}+make_a_title (3 experts)"
      stem, _, rest = ref["train_prompt"].partition("{")
      options, _, tail = rest.partition("}")
      tail = tail.split(" (")[0]
      assert prompts == [f"{stem}{o}{tail}" for o in options.split(",")]
    else:
      assert prompts == [ref["train_prompt"]]
    for plan, _ in experts:
      assert plan.epochs == ref["epochs"]
      assert (plan.learning_rate, plan.input_length, plan.target_length, plan.samples) == (1e-4, 512, 256, 100_000)


def test_full_parameter_dataset_experts():
  got = plans.recipe_plans("dataset_full")
  assert len(got) == 36
  for plan in got:
    assert (plan.optimizer, plan.schedule, plan.learning_rate, plan.max_grad_norm, plan.batch_size,
            plan.samples, plan.epochs, plan.input_length, plan.target_length) == (
        "adafactor", "constant", 1e-4, 0.5, 128, 100_000, 5, 512, 128)
    assert plan.steps == 5 * -(-100_000 // 128)


def test_groups_share_shapes_and_cover_every_expert_once():
  for kind, size in (("prompt", 8), ("dataset", 8), ("continual", 8), ("dataset_full", 1)):
    groups = plans.recipe_groups(kind, size)
    names = [p.name for g in groups for p in g]
    assert sorted(names) == sorted(p.name for p in plans.recipe_plans(kind))
    for group in groups:
      assert 1 <= len(group) <= size and len({p.shape_key() for p in group}) == 1
  with pytest.raises(Exception, match=r"GROUP \(plans.recipe_group.group\): expected a group number 0\.\.\d+ .*got 999"):
    plans.recipe_group("prompt", 999, 8)


@pytest.fixture
def fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("recipe, kind", [("elm_prompt_experts_xl.gin", "prompt"),
                                          ("elm_dataset_experts_xl.gin", "dataset"),
                                          ("elm_dataset_experts_full_xl.gin", "dataset_full"),
                                          ("elm_continual_experts_xl.gin", "continual")])
def test_dry_run_prints_every_experts_plan(recipe, kind, fresh_gin, capsys, tmp_path, monkeypatch):
  """`elm-jax train --dry_run` on an XL recipe prints its whole plan without reading data or
  building the model (no P3 copy here; the XL model is never initialised)."""
  monkeypatch.delenv("ELM_P3_DATA_DIR", raising=False)
  assert cli.main(["train", f"--gin_file=experiments/{recipe}", f"--gin.MODEL_DIR='{tmp_path}/m'",
                   "--dry_run"]) == 0
  out = capsys.readouterr().out
  expected = plans.recipe_plans(kind)
  assert f"{kind} recipe: {len(expected)} experts" in out
  for plan in expected:
    assert f"| {plan.name} | " in out
  assert not os.listdir(tmp_path)  # nothing written


def test_recipe_group_binds_plans_through_gin(fresh_gin):
  gin_utils.parse_gin(gin_utils.GinFlags(files=["experiments/elm_prompt_experts_xl.gin"],
                                         bindings=["GROUP = 3"]))
  group = gin.query_parameter("run.train.plan_group").scoped_configurable_fn()
  assert group.index == 3 and group.plans == tuple(plans.recipe_groups("prompt", 8)[3])
  assert gin.query_parameter("t5_config.T5Config.softmax_vocab_size") == 32100
  assert gin.query_parameter("t5_config.T5Config.dropout_rate") == 0.1
