"""The ELM mixtures over a tiny P3 copy: budgets, T0 rates, the held-out rank-classification suite."""

import json
import os
import pathlib

import numpy as np
import pytest
import seqio

from tasks import instances, inventory, mixtures
from tests.helpers.p3_data import SCORE_FEATURES, TRAIN_FEATURES, make_examples, separate_registry, write_subset


GOLDEN_RANDPERM = pathlib.Path(__file__).parents[1] / "golden" / "torch_randperm" / "randperm_golden.json"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("p3_mix"))
  inv = inventory.load_inventory()
  cosmos = [p["name"] for p in inv["prompt_experts"] if p["dataset"] == "cosmos_qa"][:2]
  examples = make_examples(12)
  for i, example in enumerate(examples):  # as P3 caches them: inputs without EOS (some with, here)
    if i % 3:
      example["inputs"] = example["inputs"][:-1]
  for name in cosmos:
    write_subset(root, name, "train", TRAIN_FEATURES, examples, shards=1)
  # Pretend the second prompt's dataset is "too large" for T0's cap: its stats say 600,000.
  with open(os.path.join(root, cosmos[1], "stats.train.json"), "w") as f:
    json.dump({"examples": 600_000}, f)
  # A T0 training prompt that is none of ELM's 296, and subsets T0 did not train on.
  for extra in ("duorc_SelfRC_answer_question", "super_glue_cb_can_we_infer", f"{cosmos[0]}_score_eval"):
    write_subset(root, extra, "train", TRAIN_FEATURES, make_examples(4), shards=1)
  cb = "super_glue_cb_can_we_infer_score_eval"
  write_subset(root, cb, "validation", SCORE_FEATURES, make_examples(6, score=True), shards=1)
  with separate_registry():
    yield root, mixtures.register_elm_tasks(data_dir=root), cosmos, cb


def test_everything_is_registered_without_reading_data(registered):
  _, reg, _, _ = registered
  assert len(reg) == 36 + 36 + 2  # dataset experts, their random-prompt twins, t0_train, held-out
  assert len(reg[inventory.HELD_OUT_MIXTURE]) == 113
  assert len([n for n in seqio.TaskRegistry.names() if n.startswith("elm_pe_")]) == 296
  assert seqio.MixtureRegistry.get("cosmos_qa_all_prompts")
  assert seqio.MixtureRegistry.get("cosmos_qa_random_prompt")


def test_elm_inputs_end_with_exactly_one_eos_and_t0s_keep_p3s(registered):
  """The paper tokenized its inputs with the T5 tokenizer, which ends them with EOS; P3 caches
  them without (t-zero used add_eos=False). ELM's tasks add one EOS where it is missing and
  leave an input that has one alone; T0's mixture keeps P3's inputs as they are."""
  _, _, cosmos, _ = registered
  elm = list(seqio.TaskRegistry.get(f"elm_pe_{cosmos[0]}").get_dataset(
      split="train", shuffle=False).as_numpy_iterator())
  raw = list(seqio.TaskRegistry.get(cosmos[0]).get_dataset(split="train", shuffle=False).as_numpy_iterator())
  assert len(elm) == len(raw) == 12
  assert sum(r["inputs"][-1] != 1 for r in raw) == 8  # P3 as published: most without EOS
  for e, r in zip(elm, raw):
    assert e["inputs"][-1] == 1 and (len(e["inputs"]) < 2 or e["inputs"][-2] != 1)
    base = r["inputs"] if r["inputs"][-1] == 1 else np.append(r["inputs"], 1)
    np.testing.assert_array_equal(e["inputs"], base)
  t0_rows = list(seqio.TaskRegistry.get(cosmos[0]).get_dataset(split="train", shuffle=False).as_numpy_iterator())
  assert [list(r["inputs"]) for r in t0_rows] == [list(r["inputs"]) for r in raw]


@pytest.mark.parametrize("sampling", ["permutation", "first"])
def test_budgets_are_drawn_as_the_papers_task_classes_draw_them(registered, sampling):
  """A budget of 5 of 12 rows: the first 5, or the first 5 of the paper's torch.randperm(12,
  generator seed 42) over the whole split, computed without PyTorch."""
  _, _, cosmos, _ = registered
  base = seqio.TaskRegistry.get(cosmos[0])
  sample = inventory.TrainSample(5, sampling)
  source = mixtures._budgeted_source(base.source, sample, lambda: 12)
  rows = [r["inputs_pretokenized"] for r in source.get_dataset(split="train", shuffle=False).as_numpy_iterator()]
  every = [r["inputs_pretokenized"] for r in base.get_dataset(split="train", shuffle=False).as_numpy_iterator()]
  if sampling == "first":
    assert rows == every[:5]
  else:
    chosen = sorted(instances.torch_randperm(12, 42)[:5])
    assert rows == [every[i] for i in chosen]
  validation_untouched = mixtures._budgeted_source(base.source, sample, lambda: 12)
  assert validation_untouched.splits == base.source.splits
  assert mixtures.budget_rows(12, None, "all") is None and mixtures.budget_rows(4, 5, "permutation") is None
  # The rows torch.randperm(10, generator seed 42) puts first (PyTorch's own output, golden).
  golden = json.load(open(GOLDEN_RANDPERM))
  first = next(c["first"] for c in golden["cases"] if (c["n"], c["seed"]) == (10, 42))
  assert list(np.flatnonzero(mixtures.budget_rows(10, 4, "permutation"))) == sorted(first[:4])
  # A draw from a slice (multi_news: 4 of its first 10 rows of 12): only rows of the slice.
  keep = mixtures.budget_rows(12, 4, "permutation", drawn_from=10)
  assert keep.sum() == 4 and not keep[10:].any() and list(np.flatnonzero(keep)) == sorted(first[:4])
  assert list(np.flatnonzero(mixtures.budget_rows(12, None, "all", drawn_from=8))) == list(range(8))


@pytest.mark.parametrize("dataset, budget, code, configs", [
    ("amazon_polarity", 5556, (50_000, "first", None), (5556, "first", None)),
    ("app_reviews", 12_500, (50_000, "first", None), (12_500, "permutation", None)),
    ("gigaword", 1112, (10_000, "first", None), (1112, "first", None)),
    ("trec", 2778, (None, "all", None), (2778, "permutation", None)),
    ("rotten_tomatoes", 50_000, (None, "all", None), (50_000, "permutation", None)),
    ("multi_news", 1666, (1666, "permutation", 10_000), (1666, "first", None)),
    ("cosmos_qa", 3847, (3847, "permutation", None), (3847, "permutation", None)),
    ("trec", None, (None, "all", None), (None, "all", None))])
def test_the_papers_code_takes_its_classes_slices(dataset, budget, code, configs):
  """`AbstractTask.get` of the ten whole-slice classes ignores max_train_samples (ELM_NOTES §1.5,
  correction): their experts train on the slice by default; the configs' budgets on request."""
  for follows, want in (("code", code), ("configs", configs)):
    got = inventory.train_sample(dataset, budget, follows)
    assert (got.samples, got.sampling, got.drawn_from) == want, follows
  with pytest.raises(Exception, match=r"sampling_follows: expected one of \['code', 'configs'\], got 'x'"):
    inventory.train_sample("imdb", 10, "x")


def test_full_parameter_experts_train_on_every_template_of_the_dataset(registered):
  """`<dataset>_random_prompt` holds every P3 training subset of the dataset in the copy (here
  cosmos_qa's two prompt-expert subsets and not its `_score_eval` twin), not the prompt-expert
  list, each cut to one sample of at most 100k rows."""
  root, reg, cosmos, _ = registered
  assert reg["cosmos_qa_random_prompt"] == [f"elm_fde_{c}" for c in sorted(cosmos)]
  de = next(d for d in inventory.load_inventory()["dataset_experts"] if d["name"] == "cosmos_qa")
  assert mixtures.dataset_templates(de, root) == sorted(cosmos)
  quarel = next(d for d in inventory.load_inventory()["dataset_experts"] if d["name"] == "quarel")
  assert mixtures.dataset_templates(quarel, root) == quarel["prompt_experts"]  # none in the copy


def test_t0_train_is_t0s_mixture_at_t0s_rates(registered):
  root, reg, cosmos, _ = registered
  # Every P3 training subset of T0's training datasets in the copy, not only ELM's prompts; not
  # other datasets' subsets, not _score_eval ones.
  assert reg["t0_train"] == sorted(cosmos + ["duorc_SelfRC_answer_question"])
  mixture = seqio.MixtureRegistry.get("t0_train")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates[cosmos[0]] == 12  # under the cap: its example count
  assert rates[cosmos[1]] == 500_000 // 2  # over the cap: 500k / the 2 cosmos_qa subsets T0 trains on
  assert rates["duorc_SelfRC_answer_question"] == 4


def test_experts_p3_does_not_hold_name_what_to_set(registered, monkeypatch):
  _, _, _, _ = registered
  name = next(p["name"] for p in inventory.load_inventory()["prompt_experts"] if p["dataset"] == "commonsense_qa")
  task = seqio.TaskRegistry.get(f"elm_pe_{name}")
  with pytest.raises(Exception, match=r"commonsense_qa is not in P3 as published.*ELM_RAW_DATA_DIR"):
    list(task.get_dataset(split="train", shuffle=False))
  assert "hellaswag_how_ends_score_eval" in seqio.TaskRegistry.names()
  assert "story_cloze_2016_Answer_Given_options_score_eval" in seqio.TaskRegistry.names()


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
