"""Retrieval keys and queries are the rows the paper's code picks: `torch.randperm(n, seed 42)`
reproduced without PyTorch (against tests/golden/torch_randperm, made by
tools/make_randperm_golden.py with PyTorch), drawn over the population its task classes load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import seqio

from tasks import instances, inventory, p3, randperm
from tests.helpers.p3_data import SCORE_FEATURES, TRAIN_FEATURES, make_examples, separate_registry, write_subset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(REPO, "tests", "golden", "torch_randperm", "randperm_golden.json")
REFERENCE = os.path.join(REPO, "tests", "golden", "elm_reference", "elm_reference.json")
SHARED_REFERENCE = os.path.join(REPO, "..", "shared", "reference", "elm_reference.json")


@pytest.fixture(scope="module")
def golden() -> dict:
  with open(GOLDEN) as f:
    data = json.load(f)
  return {(c["n"], c["seed"]): c["first"] for c in data["cases"]} | {"branch_n": data["branch_n"]}


def test_torch_randperm_equals_pytorch(golden):
  """Every (n, seed) PyTorch recorded, up to the last n of its 32-bit branch (214,748,363)."""
  checked = 0
  for key, first in golden.items():
    if key == "branch_n" or key[0] >= instances.TORCH_RANDPERM_BRANCH_N:
      continue
    n, seed = key
    np.testing.assert_array_equal(instances.torch_randperm(n, seed, len(first)), np.asarray(first, np.int64),
                                  err_msg=f"n={n} seed={seed}")
    checked += 1
  assert checked >= 15
  assert (instances.TORCH_RANDPERM_BRANCH_N - 1, 42) in golden


def test_torch_randperm_refuses_pytorchs_64_bit_branch(golden):
  assert golden["branch_n"] == instances.TORCH_RANDPERM_BRANCH_N == 214_748_364
  assert (instances.TORCH_RANDPERM_BRANCH_N, 42) in golden  # PyTorch's rows there differ from the loop's
  with pytest.raises(randperm.RandpermError, match="n must be in .0, 214748364.*64-bit.*got 214748364"):
    instances.torch_randperm(instances.TORCH_RANDPERM_BRANCH_N, 42, 5)
  with pytest.raises(randperm.RandpermError, match="seed must be in"):
    instances.torch_randperm(5, -1)


def test_torch_randperm_prefix_and_permutation():
  full = instances.torch_randperm(5_000)
  assert sorted(full.tolist()) == list(range(5_000))
  np.testing.assert_array_equal(instances.torch_randperm(5_000, k=37), full[:37])
  assert instances.torch_randperm(3, k=10).tolist() == instances.torch_randperm(3).tolist()
  assert instances.torch_randperm(0).tolist() == []


def test_raw_draws_are_the_mt19937_outputs():
  """numpy's legacy RandomState(42) is MT19937 seeded by init_genrand, as torch.Generator is;
  randint over [0, 2**32) hands out its raw 32-bit outputs (the first of seed 42 is 1608637542)."""
  draws = np.random.RandomState(42).randint(0, 2**32, size=4, dtype=np.uint64)
  bits = np.random.MT19937()
  bits._legacy_seeding(42)
  np.testing.assert_array_equal(draws, bits.random_raw(4))
  assert int(draws[0]) == 1608637542


# ---- the rows picked, on P3-layout fixtures --------------------------------------------------

def _pe(dataset: str) -> str:
  return next(p["name"] for p in inventory.load_inventory()["prompt_experts"] if p["dataset"] == dataset)


RANK_TASK = "fixture_instances_rank_score_eval"
SMALL_TASK = "fixture_instances_small"


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory):
  """An imdb prompt expert's train split of 1,871 rows (label-sorted, one shard: row i is
  "question i"), a rank-classification validation split of 300 examples (2 rows each) and a
  10-row train split; removed from the registry afterwards."""
  root = str(tmp_path_factory.mktemp("p3_instances"))
  imdb = _pe("imdb")
  rows = make_examples(1_871)
  for i, row in enumerate(rows):  # label-sorted, as imdb's split is
    row["targets_pretokenized"] = "no" if i < 936 else "yes"
  write_subset(root, imdb, "train", TRAIN_FEATURES, rows, shards=1)
  write_subset(root, RANK_TASK, "validation", SCORE_FEATURES, make_examples(600, score=True), shards=1)
  write_subset(root, SMALL_TASK, "train", TRAIN_FEATURES, make_examples(10), shards=1)
  with separate_registry():
    for name in [imdb, RANK_TASK, SMALL_TASK]:
      p3.register_p3_task(name, root)
    yield imdb


def test_keys_are_the_first_100_of_torch_randperm_over_the_split(fixture_tasks, golden):
  """`elm_pe_<imdb prompt>` draws from its prompt's whole train split (the class's first 50,000
  rows; this split has 1,871), not from the expert's budgeted sample: the rows at
  torch.randperm(1871, seed 42)[:100], in that order, as `seen_train_100.json` holds them."""
  imdb = fixture_tasks
  assert instances.key_source(f"elm_pe_{imdb}") == (imdb, "train", 50_000)
  keys = instances.training_keys(f"elm_pe_{imdb}")
  expected = golden[(1_871, 42)][:100]
  assert [k["inputs"] for k in keys] == [f"question {i}" for i in expected]
  assert [k["targets"] for k in keys] == ["no" if i < 936 else "yes" for i in expected]
  assert keys[0]["answer_choices"] == ["yes", "no"]
  assert instances.training_keys(imdb) == keys


def test_keys_of_a_first_n_slice_are_drawn_within_it(fixture_tasks, golden):
  """A class that loads the first N rows: the draw is randperm(N) over those N rows."""
  picked = instances.sampled_instances(fixture_tasks, "train", 40, first_rows=300)
  assert [r["inputs"] for r in picked] == [f"question {i}" for i in golden[(300, 42)][:40]]


def test_a_split_smaller_than_the_sample_gives_all_of_it_in_draw_order(fixture_tasks, golden):
  keys = instances.training_keys(SMALL_TASK)
  assert [k["inputs"] for k in keys] == [f"question {i}" for i in golden[(10, 42)]]


def test_queries_are_the_first_32_of_the_draw_over_the_examples(fixture_tasks, golden):
  """`unseen_eval_300.json` holds randperm(n, 42)[:300] of each held-out prompt's validation
  examples in draw order; `run_retrieval.py` votes with its first 32."""
  queries = instances.query_instances(RANK_TASK)
  examples = golden[(300, 42)][:32]
  assert [q["inputs"] for q in queries] == [f"question {2 * e}" for e in examples]
  assert all(q["label"] is None and q["targets"] is None for q in queries)
  labelled = instances.query_instances(RANK_TASK, labelled=True)
  assert [q["label"] for q in labelled] == [0] * 32 and labelled[0]["answer_choices"] == ["yes", "no"]
  assert [q["inputs"] for q in instances.query_instances(RANK_TASK, 5)] == [q["inputs"] for q in queries[:5]]


def test_a_mixture_gives_each_members_draw_in_turn(fixture_tasks, golden):
  name = "fixture_instances_mixture"
  seqio.MixtureRegistry.add(name, [SMALL_TASK, fixture_tasks], default_rate=1.0)
  try:
    picked = instances.sampled_instances(name, "train", 6)
  finally:
    seqio.MixtureRegistry.remove(name)
  small, imdb = golden[(10, 42)], golden[(1_871, 42)]
  assert [r["inputs"] for r in picked] == [f"question {i}" for i in
                                           (small[0], imdb[0], small[1], imdb[1], small[2], imdb[2])]


# ---- which population, per expert --------------------------------------------------------------

def _reference() -> dict:
  path = SHARED_REFERENCE if os.path.isfile(SHARED_REFERENCE) else REFERENCE
  with open(path) as f:
    return json.load(f)


def test_key_population_follows_the_paper_task_classes():
  """The classes of `official_code_whole_slice` load their slice (keys are drawn from it);
  multi_news loads its first 10,000; every other prompt's keys come from its whole train split."""
  whole = _reference()["official_code_whole_slice"]
  sizes = {**{d: 50_000 for d in whole["first_50000_train_rows"]},
           **{d: 10_000 for d in whole["first_10000_train_rows"]},
           **{d: None for d in whole["whole_train_split"]}}
  inv = inventory.load_inventory()
  seen = set()
  for pe in inv["prompt_experts"]:
    expected = sizes.get(pe["dataset"], 10_000 if pe["dataset"] == "multi_news" else None)
    for prefix in ("elm_pe_", "elm_de_", "elm_fde_"):
      source, split, first = instances.key_source(prefix + pe["name"])
      assert (split, first) == ("train", expected), pe["name"]
    seen.add(pe["dataset"])
  assert {d for d in sizes if d != "wiki_auto"} <= seen  # wiki_auto is a continual expert


def test_continual_keys_come_from_the_validation_split_as_the_target_train_script_loads_it():
  by_dataset = {e.dataset: e.name for e in inventory.CONTINUAL_EXPERTS}
  assert instances.key_source(by_dataset["wiki_auto"]) == (by_dataset["wiki_auto"], "validation", 300)
  assert instances.key_source(by_dataset["haiku"])[1:] == ("validation", None)
  assert instances.key_source(by_dataset["covid_qa"])[1:] == ("train", None)
  assert all(instances.key_source(e.name)[1] in ("train", "validation") for e in inventory.CONTINUAL_EXPERTS)
  assert instances.key_source("builtin_anything", "validation") == ("builtin_anything", "validation", None)
