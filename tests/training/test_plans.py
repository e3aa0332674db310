"""Every expert of every XL recipe resolves to a plan that matches the paper's code and configs
field by field, as the project's reference facts state them (elm_reference.json, read here at
test time from ../shared/reference/ when it is beside the checkout, else from the copy that
tools/copy_reference.py keeps in tests/golden/, which must then still equal it): the rows each
expert trains on and how they are drawn (`official_code_whole_slice`), its prompts and steps.
Steps that follow from the data are checked on P3-layout fixtures of known sizes for every
recipe, at plan time (stats files, continual row counts) and as `elm-jax train` counts them."""

from __future__ import annotations

import collections
import json
import math
import os

import gin
import pytest

from elm_jax.commands import cli, gin_utils
from elm_jax.training import plans
from tasks import inventory, mixtures
from tests.helpers import p3_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, "..", "shared", "reference", "elm_reference.json")
COPY = os.path.join(REPO, "tests", "golden", "elm_reference", "elm_reference.json")
# ELM_NOTES §1.5: multi_news's class slices its first 10,000 rows and then draws the budget
# from them (it is not one of the classes that ignore the budget).
SLICE_THEN_DRAW = {"multi_news": 10_000}
# The classes ELM_NOTES §1.5 says take their first rows: with the configs' budgets, the first N.
CONFIG_FIRST_ROWS = {"wiki_hop", "amazon_polarity", "yelp_review_full", "dbpedia_14", "imdb", "gigaword",
                     "multi_news"}


@pytest.fixture(scope="module")
def reference() -> dict:
  """The shared reference when it is beside the checkout (checked against the golden copy), else
  the golden copy."""
  copy = json.load(open(COPY))
  if os.path.isfile(SHARED):
    shared = json.load(open(SHARED))
    assert shared == copy, "tests/golden/elm_reference is stale: run tools/copy_reference.py"
    return shared
  return copy


@pytest.fixture(scope="module")
def whole_slice(reference) -> dict:
  """dataset -> the slice the paper's code trains on whatever the budget (None: the whole
  split), from the reference's `official_code_whole_slice`."""
  facts = reference["official_code_whole_slice"]
  out = {d: 50_000 for d in facts["first_50000_train_rows"]}
  out.update({d: 10_000 for d in facts["first_10000_train_rows"]})
  out.update({d: None for d in facts["whole_train_split"]})
  assert len(out) == 10
  return out


def expected_rows(dataset, budget, whole_slice, follows="code"):
  """(samples, sampling, drawn_from) of an expert of `dataset` whose config says `budget`."""
  if follows == "code" and dataset in whole_slice:
    size = whole_slice[dataset]
    return (None, "all", None) if size is None else (size, "first", None)
  if budget is None:
    return (None, "all", None)
  if follows == "code" and dataset in SLICE_THEN_DRAW:
    return (budget, "permutation", SLICE_THEN_DRAW[dataset])
  return (budget, "first" if dataset in CONFIG_FIRST_ROWS else "permutation", None)


def _subset(value):
  return None if value in (None, "none") else value


def _bound(samples, epochs, batch):
  return None if samples is None else epochs * math.ceil(samples / batch)


def test_the_code_rule_is_the_references(whole_slice):
  assert inventory.WHOLE_SLICE == whole_slice


@pytest.mark.parametrize("follows", ["code", "configs"])
def test_prompt_expert_plans_match_the_papers_code(reference, whole_slice, follows):
  rows = {(r["dataset"], _subset(r["subset"]), r["prompts"][0]): r for r in reference["prompt_experts"]}
  inv = {p["name"]: p for p in inventory.load_inventory()["prompt_experts"]}
  got = plans.recipe_plans("prompt", sampling_follows=follows)
  assert len(got) == len(reference["prompt_experts"]) == 296
  for plan in got:
    row = inv[plan.name]
    ref = rows[(row["dataset"], _subset(row["subset"]), row["prompt"])]
    assert (plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length) == (
        ref["batch_size"], ref["epochs"], ref["learning_rate"], ref["max_source_length"]), plan.name
    want = expected_rows(row["dataset"], ref["max_train_samples"], whole_slice, follows)
    assert (plan.samples, plan.sampling, plan.drawn_from) == want, plan.name
    opt = reference["optimizer"]
    assert (plan.optimizer, plan.max_grad_norm, plan.warmup_steps, plan.schedule) == (
        opt["name"].lower(), opt["max_grad_norm"], 0, "linear"), plan.name
    assert (plan.target_length, plan.dropout, plan.seed) == (128, 0.1, 42)
    assert (plan.prompts, plan.prompt_draw) == ((row["prompt"],), plans.ONE_PROMPT)
    # No data here: the budget's steps, an upper bound (None for a whole split).
    assert not plan.steps_exact
    assert plan.steps == _bound(want[0] if want[2] is None else min(want[0], want[2]), ref["epochs"],
                                ref["batch_size"]), plan.name
    assert plan.data == ("raw+templates" if (row["dataset"], _subset(row["subset"])) in mixtures.NOT_IN_P3
                         else "p3")
  assert sum(p.data == "raw+templates" for p in got) == 16
  by_dataset = {p.dataset: p for p in got}
  if follows == "code":  # the slice whatever the config says
    assert (by_dataset["app_reviews"].samples, by_dataset["app_reviews"].sampling) == (50_000, "first")
    assert (by_dataset["rotten_tomatoes"].samples, by_dataset["rotten_tomatoes"].sampling) == (None, "all")
  else:
    assert (by_dataset["rotten_tomatoes"].samples, by_dataset["rotten_tomatoes"].sampling) == (50_000, "permutation")


@pytest.mark.parametrize("follows", ["code", "configs"])
def test_dataset_expert_plans_match_the_papers_code(reference, whole_slice, follows):
  rows = {(r["dataset"], _subset(r["subset"])): r for r in reference["dataset_experts_adapter"]}
  got = plans.recipe_plans("dataset", sampling_follows=follows)
  assert len(got) == 36
  prompt_plans = {p.name: p for p in plans.recipe_plans("prompt", sampling_follows=follows)}
  inv = {d["name"]: d for d in inventory.load_inventory()["dataset_experts"]}
  for plan in got:
    row = inv[plan.name]
    ref = rows.get((row["dataset"], _subset(row["subset"])))
    if ref is None:  # wiki_bio: no `*_all` config; one prompt, whose expert's plan it follows
      assert plan.dataset == "wiki_bio" and len(plan.prompts) == 1
      single = prompt_plans[plan.prompts[0]]
      assert (plan.samples, plan.sampling, plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length,
              plan.steps) == (single.samples, single.sampling, single.batch_size, single.epochs,
                              single.learning_rate, single.input_length, single.steps)
      continue
    assert (plan.batch_size, plan.epochs, plan.learning_rate, plan.input_length) == (
        ref["batch_size"], ref["epochs"], ref["learning_rate"], ref["max_source_length"]), plan.name
    want = expected_rows(row["dataset"], ref["max_train_samples"], whole_slice, follows)
    assert (plan.samples, plan.sampling, plan.drawn_from) == want, plan.name
    assert sorted(plan.prompts) == sorted(row["prompt_experts"]) and len(plan.prompts) == len(ref["prompts"])
    assert plan.prompt_draw == plans.EVERY_PROMPT
    per_prompt = want[0] if want[2] is None else min(want[0], want[2])
    assert plan.steps == (None if per_prompt is None else
                          _bound(per_prompt * len(ref["prompts"]), ref["epochs"], ref["batch_size"])), plan.name
  amazon = next(p for p in got if p.dataset == "amazon_polarity")
  # The paper's code: 9 prompts x 50,000 rows per epoch; its config: 9 x 5,556.
  assert amazon.samples * len(amazon.prompts) == (450_000 if follows == "code" else 50_004)


@pytest.mark.parametrize("follows", ["code", "configs"])
def test_continual_expert_plans_expand_the_papers_tasks(reference, whole_slice, follows):
  got = plans.recipe_plans("continual", sampling_follows=follows)
  assert len(got) == 10
  by_task = collections.defaultdict(list)
  for plan, expert in zip(got, inventory.CONTINUAL_EXPERTS):
    by_task[expert.task].append((plan, expert))
  assert [r["task"] for r in reference["continual_tasks"]] == list(by_task)
  whole = set(reference["official_code_whole_slice"]["whole_train_split"])
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
    for plan, expert in experts:
      assert plan.epochs == ref["epochs"]
      assert (plan.learning_rate, plan.input_length, plan.target_length) == (1e-4, 512, 256)
      if follows == "code" and expert.dataset in whole:  # wiki_auto: its whole file, as its class
        assert (plan.samples, plan.sampling, plan.steps) == (None, "all", None)
      else:  # at most 100k, drawn with seed 42
        assert (plan.samples, plan.sampling) == (100_000, "permutation")
        assert plan.steps == _bound(100_000, ref["epochs"], plan.batch_size) and not plan.steps_exact


def test_full_parameter_dataset_experts(monkeypatch):
  monkeypatch.delenv("ELM_P3_DATA_DIR", raising=False)
  got = plans.recipe_plans("dataset_full")
  assert len(got) == 36
  for plan in got:
    assert (plan.optimizer, plan.schedule, plan.learning_rate, plan.max_grad_norm, plan.batch_size,
            plan.samples, plan.sampling, plan.epochs, plan.input_length, plan.target_length) == (
        "adafactor", "constant", 1e-4, 0.5, 128, 100_000, "permutation", 5, 512, 128)
    # No P3 copy here: the prompt-expert list stands in for the dataset's templates, and says so
    # (the 3 datasets built from raw data use their prompt experts' templates).
    raw = plan.data == "raw+templates"
    assert plan.prompt_draw == plans.ONE_PER_EXAMPLE + ("" if raw else plans.NO_TEMPLATE_LIST)
    assert plan.steps == 5 * -(-100_000 // 128) and not plan.steps_exact  # no data: the upper bound


def test_groups_share_shapes_and_cover_every_expert_once():
  for recipe, size in (("prompt", 8), ("dataset", 8), ("continual", 8), ("dataset_full", 1)):
    groups = plans.recipe_groups(recipe, size)
    names = [p.name for g in groups for p in g]
    assert sorted(names) == sorted(p.name for p in plans.recipe_plans(recipe))
    for group in groups:
      assert 1 <= len(group) <= size and len({p.shape_key() for p in group}) == 1
  with pytest.raises(Exception, match=r"GROUP \(plans.recipe_group.group\): expected a group number 0\.\.\d+ .*got 999"):
    plans.recipe_group("prompt", 999, 8)
  with pytest.raises(Exception, match=r"SAMPLING_FOLLOWS \(plans.recipe_group.sampling_follows\): expected one "
                                      r"of \['code', 'configs'\], got 'paper'"):
    plans.recipe_group("prompt", 0, 8, sampling_follows="paper")


@pytest.fixture
def fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_recipe_group_is_bound_by_recipe_or_by_its_older_gin_name_kind(fresh_gin, monkeypatch):
  """Gin files written before the rename bind `plans.recipe_group.kind`; it still selects the
  recipe, and a `recipe` and a `kind` that disagree are refused."""
  monkeypatch.delenv("ELM_P3_DATA_DIR", raising=False)
  monkeypatch.delenv("ELM_CONTINUAL_DATA_DIR", raising=False)
  expected = tuple(plans.recipe_groups("continual", 4)[1])
  for name in ("recipe", "kind"):
    gin.clear_config()
    gin.parse_config("\n".join([
        "from __gin__ import dynamic_registration", "import elm_jax.training.plans as plans",
        "import elm_jax.training.run as run", "run.train.plan_group = @plans.recipe_group()",
        f"plans.recipe_group.{name} = 'continual'", "plans.recipe_group.group = 1",
        "plans.recipe_group.group_size = 4"]))
    group = gin.query_parameter("run.train.plan_group").scoped_configurable_fn()
    assert (group.recipe, group.index, group.plans) == ("continual", 1, expected), name
    assert all(p.recipe == "continual" for p in group.plans)
  with pytest.raises(Exception, match=r"recipe='prompt' and kind='continual' \(its older name\) disagree"):
    plans.recipe_group("prompt", 0, 8, kind="continual")
  with pytest.raises(Exception, match=r"RECIPE \(plans.recipe_group.recipe\): expected one of \['prompt', "):
    plans.recipe_group("prompts", 0, 8)


@pytest.mark.parametrize("gin_file, recipe", [("elm_prompt_experts_xl.gin", "prompt"),
                                              ("elm_dataset_experts_xl.gin", "dataset"),
                                              ("elm_dataset_experts_full_xl.gin", "dataset_full"),
                                              ("elm_continual_experts_xl.gin", "continual")])
def test_dry_run_prints_every_experts_plan(gin_file, recipe, fresh_gin, capsys, tmp_path, monkeypatch):
  """`elm-jax train --dry_run` on an XL recipe prints its whole plan without reading data or
  building the model (no data here: upper bounds, said to be so; the XL model is never
  initialised)."""
  monkeypatch.delenv("ELM_P3_DATA_DIR", raising=False)
  monkeypatch.delenv("ELM_CONTINUAL_DATA_DIR", raising=False)
  assert cli.main(["train", f"--gin_file=experiments/{gin_file}", f"--gin.MODEL_DIR='{tmp_path}/m'",
                   "--dry_run"]) == 0
  out = capsys.readouterr().out
  expected = plans.recipe_plans(recipe)
  assert f"{recipe} recipe: {len(expected)} experts" in out
  for plan in expected:
    assert f"| {plan.name} | " in out
  assert plans.UPPER_BOUND_NOTE in out and "<= " in out
  assert "rows as the paper's code takes them" in out
  assert not os.listdir(tmp_path)  # nothing written


def test_train_never_runs_an_upper_bound_and_checks_sampling_follows(fresh_gin, capsys, tmp_path, monkeypatch):
  """Without its data a continual expert's steps cannot be known: train refuses, naming what to
  set, before it loads anything (it used to train the 100k cap's 625,000 steps for covid_qa)."""
  monkeypatch.delenv("ELM_P3_DATA_DIR", raising=False)
  monkeypatch.delenv("ELM_CONTINUAL_DATA_DIR", raising=False)
  argv = ["train", "--gin_file=experiments/elm_continual_experts_xl.gin", f"--gin.MODEL_DIR='{tmp_path}/m'"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "need their train splits' sizes" in err and "ELM_CONTINUAL_DATA_DIR" in err and err.count("error:") == 1
  gin.clear_config()
  assert cli.main(argv + ["--gin.SAMPLING_FOLLOWS='paper'", "--dry_run"]) == 2
  err = capsys.readouterr().err
  assert "expected one of ['code', 'configs'], got 'paper'" in err and err.count("error:") == 1
  assert not os.listdir(tmp_path)


def test_recipe_group_binds_plans_through_gin(fresh_gin):
  gin_utils.parse_gin(gin_utils.GinFlags(files=["experiments/elm_prompt_experts_xl.gin"],
                                         bindings=["GROUP = 3"]))
  group = gin.query_parameter("run.train.plan_group").scoped_configurable_fn()
  assert group.index == 3 and group.plans == tuple(plans.recipe_groups("prompt", 8)[3])
  assert group.sampling_follows == "code"
  assert gin.query_parameter("t5_config.T5Config.softmax_vocab_size") == 32100
  assert gin.query_parameter("t5_config.T5Config.dropout_rate") == 0.1


def test_sampling_follows_the_configs_through_gin(fresh_gin):
  gin_utils.parse_gin(gin_utils.GinFlags(files=["experiments/elm_dataset_experts_xl.gin"],
                                         bindings=["SAMPLING_FOLLOWS = 'configs'"]))
  group = gin.query_parameter("run.train.plan_group").scoped_configurable_fn()
  assert group.sampling_follows == "configs"
  assert gin.query_parameter("%SAMPLING_FOLLOWS") == "configs"  # what the tasks' registration takes too
  assert str(gin.query_parameter("mixtures.register_elm_tasks.sampling_follows")) == "%SAMPLING_FOLLOWS"
  assert group.plans == tuple(plans.recipe_groups("dataset", 8, sampling_follows="configs")[0])


def test_full_parameter_recipe_scores_over_every_entry(fresh_gin):
  """The [C] trainer never resizes T5's embeddings: its softmax covers all 32,128 entries."""
  gin_utils.parse_gin(gin_utils.GinFlags(files=["experiments/elm_dataset_experts_full_xl.gin"], bindings=[]))
  assert gin.query_parameter("t5_config.T5Config.softmax_vocab_size") is None
  config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  assert config.softmax_vocab_size is None and config.vocab_size == 32128


# ------------------------------------------------------------------ steps that follow from the data
QUAREL_ROWS, AMAZON_ROWS, COVID_ROWS, BIG = 1941, 60_000, 2019, 100_003


def _inventory_rows(dataset):
  inv = inventory.load_inventory()
  return ([p["name"] for p in inv["prompt_experts"] if p["dataset"] == dataset],
          next(d for d in inv["dataset_experts"] if d["dataset"] == dataset))


@pytest.fixture(scope="module")
def sized_data(tmp_path_factory):
  """A P3 copy known by its stats files (quarel's 5 prompt subsets and 2 more templates, one of
  them label-dependent and smaller; amazon_polarity's 9) and continual files of known sizes."""
  root = str(tmp_path_factory.mktemp("p3_sized"))
  quarel, _ = _inventory_rows("quarel")
  for name in quarel + ["quarel_another_template"]:
    p3_data.write_stats(root, name, QUAREL_ROWS)
  p3_data.write_stats(root, "quarel_label_dependent_template", 700)
  p3_data.write_stats(root, "quarel_label_dependent_template_score_eval", 5)
  for name in _inventory_rows("amazon_polarity")[0]:
    p3_data.write_stats(root, name, AMAZON_ROWS)
  continual_root = str(tmp_path_factory.mktemp("continual_sized"))
  experts = {e.dataset: e.name for e in inventory.CONTINUAL_EXPERTS}
  p3_data.write_continual(continual_root, experts["covid_qa"], COVID_ROWS)
  p3_data.write_continual(continual_root, experts["wiki_auto"], BIG)
  p3_data.write_continual(continual_root, inventory.CONTINUAL_EXPERTS[1].name, BIG)  # gigaword contain
  return root, continual_root


@pytest.mark.parametrize("follows", ["code", "configs"])
def test_steps_follow_from_the_data_for_every_recipe(sized_data, reference, whole_slice, follows):
  root, continual_root = sized_data
  sizes = plans.available_split_sizes(root, continual_root)
  by = lambda recipe: {p.name: p for p in plans.recipe_plans(recipe, sizes, follows, root)}  # noqa: E731
  refs = {r["prompts"][0]: r for r in reference["prompt_experts"] if r["dataset"] in ("quarel", "amazon_polarity")}

  prompt = by("prompt")
  for name in _inventory_rows("quarel")[0] + _inventory_rows("amazon_polarity")[0]:
    plan, ref = prompt[name], refs[prompt[name].prompts[0]]
    rows = QUAREL_ROWS if plan.dataset == "quarel" else AMAZON_ROWS
    samples, _, _ = expected_rows(plan.dataset, ref["max_train_samples"], whole_slice, follows)
    assert plan.steps_exact and plan.steps == ref["epochs"] * math.ceil(min(samples, rows) / ref["batch_size"])
  assert prompt["quarel_choose_between"].steps == 5 * math.ceil(QUAREL_ROWS / 8)  # 1,215
  assert sum(p.steps_exact for p in prompt.values()) == 5 + 9  # only the experts with data

  dataset = by("dataset")
  adapter = {r["dataset"]: r for r in reference["dataset_experts_adapter"]}
  for name, rows in (("quarel", QUAREL_ROWS), ("amazon_polarity", AMAZON_ROWS)):
    plan, ref = dataset[name], adapter[name]
    per_prompt, _, _ = expected_rows(name, ref["max_train_samples"], whole_slice, follows)
    want = ref["epochs"] * math.ceil(len(ref["prompts"]) * min(per_prompt, rows) / ref["batch_size"])
    assert plan.steps_exact and plan.steps == want, name
  # amazon_polarity: the code's 9 x 50,000 rows per epoch, the config's 9 x 5,556.
  assert dataset["amazon_polarity"].steps == (5 * 450_000 // 8 if follows == "code" else 5 * math.ceil(50_004 / 8))

  full = by("dataset_full")["quarel_full"]
  # Every template of the dataset in the copy (not the prompt-expert list); the dataset's rows
  # are its largest template's: 5 epochs x ceil(min(100k, 1,941) / 128) = 80 steps.
  assert sorted(full.prompts) == sorted(_inventory_rows("quarel")[0] + [
      "quarel_another_template", "quarel_label_dependent_template"])
  assert full.steps_exact and full.steps == 80
  assert by("dataset_full")["amazon_polarity_full"].steps == 5 * math.ceil(AMAZON_ROWS / 128)

  cont = {p.dataset if p.dataset != "gigaword" else p.name: p for p in by("continual").values()}
  covid = cont["covid_qa"]
  assert covid.steps_exact and covid.steps == 50 * math.ceil(COVID_ROWS / 8)  # 12,650, not 625,000
  contain = cont[inventory.CONTINUAL_EXPERTS[1].name]
  assert contain.steps == 1 * math.ceil(100_000 / 8)  # the 100k cap
  wiki_auto = cont["wiki_auto"]  # its class takes the whole file; the configs cap it
  assert wiki_auto.steps == math.ceil((BIG if follows == "code" else 100_000) / 2)
  assert not cont["haiku"].steps_exact  # no file: the upper bound


def test_dry_run_shows_the_steps_of_the_data_on_this_machine(sized_data, monkeypatch):
  from elm_jax.training import run
  root, continual_root = sized_data
  monkeypatch.setenv("ELM_CONTINUAL_DATA_DIR", continual_root)
  group = plans.recipe_group("continual", 0, 8, data_dir=root)
  table = run.recipe_table(group, root)
  covid = next(line for line in table.splitlines() if "| ct0_covid_qa_covid_qa_deepset |" in line)
  assert "| 12,650 |" in covid and "<=" not in covid
  assert "| <= " in table and plans.UPPER_BOUND_NOTE in table  # the experts without files
  full = run.recipe_table(plans.recipe_group("dataset_full", 0, 1, data_dir=root), root)
  quarel = next(line for line in full.splitlines() if "| quarel_full |" in line)
  assert "| 7, one per example per epoch |" in quarel and "| 80 |" in quarel


@pytest.fixture(scope="module")
def record_data(tmp_path_factory):
  """A P3 copy of records without stats files (train counts them) and continual files."""
  root = str(tmp_path_factory.mktemp("p3_records"))
  quarel, _ = _inventory_rows("quarel")
  for i, name in enumerate(quarel):
    p3_data.write_subset(root, name, "train", p3_data.TRAIN_FEATURES, p3_data.make_examples(37 - i), shards=2)
  continual_root = str(tmp_path_factory.mktemp("continual_records"))
  p3_data.write_continual(continual_root, inventory.CONTINUAL_EXPERTS[5].name, 21)  # covid_qa
  return root, continual_root


def test_train_counts_the_steps_from_the_data_for_every_recipe(record_data, monkeypatch):
  """What `elm-jax train` does before it trains (`run._split_rows`), from records and files."""
  from elm_jax.training import run
  root, continual_root = record_data
  monkeypatch.setenv("ELM_CONTINUAL_DATA_DIR", continual_root)
  quarel, row = _inventory_rows("quarel")
  sizes = {name: 37 - i for i, name in enumerate(quarel)}
  plans_now = [plans.recipe_plans("prompt")[[p["name"] for p in inventory.load_inventory()["prompt_experts"]]
                                             .index(quarel[0])],
               next(p for p in plans.recipe_plans("dataset") if p.name == row["name"]),
               next(p for p in plans.recipe_plans("dataset_full", data_dir=root) if p.dataset == "quarel"),
               next(p for p in plans.recipe_plans("continual") if p.dataset == "covid_qa")]
  assert not any(p.steps_exact for p in plans_now)  # stats files absent: upper bounds at plan time
  got = [plans.PlanGroup((p,)).resolved(lambda plan: run._split_rows(plan, root)).first for p in plans_now]
  prompt, dataset, full, cont = got
  assert prompt.steps == 5 * math.ceil(37 / 8)
  assert dataset.steps == dataset.epochs * math.ceil(sum(sizes.values()) / dataset.batch_size)
  assert full.steps == 5 * math.ceil(37 / 128)
  assert cont.steps == 50 * math.ceil(21 / 8)
  assert all(p.steps_exact for p in got)
