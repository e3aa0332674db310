"""Each expert's rows, in order, per epoch (`tasks.row_order`), on a label-sorted P3 fixture.

The fixture is quarel's five prompts as P3 subsets of 40 rows each, stored label-sorted (the
first 20 rows answer 'yes', the last 20 'no', as imdb and dbpedia_14 are stored), plus a sixth
template whose subset holds only 15 rows (a label-dependent template). Row i's input starts with
token 10 + i, so a batch says which rows it holds. Checked: every epoch visits every sampled row
exactly once, in an order that differs per epoch and breaks the label runs; the batches read
through the trainer's pipeline are those rows, the same on 1 process and on 2 (each reading half
of every batch), and the same when a run restarts at a step (a kill and resume) as when it never
stopped; for prompt experts, adapter and full-parameter dataset experts (one template drawn per
row per epoch; the label-dependent one never), continual experts, and T0's mixture (at its rates).
"""

import itertools
import pathlib

import numpy as np
import pytest
import seqio

from elm_jax.training import inputs
from elm_jax.training.config import TrainConfig
from tasks import continual, inventory, mixtures, row_order
from tests.helpers.p3_data import TRAIN_FEATURES, separate_registry, write_subset

ROWS = 40
BATCH = 8


def _sorted_examples(n, shards=1):
  """Rows 0..n-1 in file order across `shards` shards (`write_subset` deals example k to shard
  k % shards, and shards are read one after another)."""
  rows = [{"inputs": [10 + i, 7, 1], "inputs_pretokenized": f"row {i}",
           "targets": [5 if i < n // 2 else 6, 1], "targets_pretokenized": "yes" if i < n // 2 else "no",
           "answer_choices": ["yes", "no"]} for i in range(n)]
  per_shard = n // shards
  return [rows[s * per_shard + k] for k in range(per_shard) for s in range(shards)]


@pytest.fixture(scope="module")
def quarel(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("p3_sorted"))
  de = next(d for d in inventory.load_inventory()["dataset_experts"] if d["name"] == "quarel")
  for name in de["prompt_experts"]:
    write_subset(root, name, "train", TRAIN_FEATURES, _sorted_examples(ROWS, 2), shards=2)
  write_subset(root, "quarel_label_dependent", "train", TRAIN_FEATURES, _sorted_examples(15), shards=1)
  write_subset(root, "ag_news_classify", "train", TRAIN_FEATURES, _sorted_examples(30), shards=1)
  with separate_registry():
    mixtures.register_elm_tasks(data_dir=root)
    # A sample smaller than the split: 12 of ag_news' 30 rows, the first of torch.randperm(30, 42).
    mixtures._register_budgeted("sampled_12", seqio.TaskRegistry.get("ag_news_classify"),
                                inventory.TrainSample(12, "permutation"), lambda: 30)
    yield de


def _epoch(order, epoch):
  return [r for s in range(order.steps_per_epoch) for r in order.split_rows(epoch * order.steps_per_epoch + s)]


def _longest_run(labels):
  return max(len(list(g)) for _, g in itertools.groupby(labels))


def test_prompt_expert_epochs_visit_every_row_once_in_new_orders(quarel):
  task = mixtures.prompt_expert_task(quarel["prompt_experts"][0])
  order = row_order.epoch_order(task, "train", BATCH, seed=7)
  assert order.order == "concatenated" and order.steps_per_epoch == ROWS // BATCH
  epochs = [[row for _, row in _epoch(order, e)] for e in range(3)]
  for rows in epochs:
    assert sorted(rows) == list(range(ROWS))  # each row exactly once
    assert _longest_run([r < ROWS // 2 for r in rows]) < 8  # file order: one run of 20
  assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
  assert row_order.epoch_order(task, "train", BATCH, seed=7).split_rows(13) == order.split_rows(13)
  assert row_order.epoch_order(task, "train", BATCH, seed=8).split_rows(0) != order.split_rows(0)


def test_a_sample_is_its_rows_only_and_an_epoch_ends_with_empty_rows():
  order = row_order.epoch_order("sampled_12", "train", BATCH, seed=0)
  want = sorted(np.flatnonzero(mixtures.budget_rows(30, 12, "permutation")).tolist())
  assert order.steps_per_epoch == 2  # ceil(12 / 8): the second batch holds 4 rows and 4 empty
  for e in range(2):
    rows = _epoch(order, e)
    assert rows[-4:] == [None] * 4
    assert sorted(r for _, r in rows[:12]) == want


def test_adapter_dataset_expert_concatenates_its_prompts(quarel):
  order = row_order.epoch_order(mixtures.dataset_expert_mixture("quarel"), "train", BATCH, seed=3)
  prompts = [f"elm_de_{p}" for p in quarel["prompt_experts"]]
  assert order.order == "concatenated" and order.epoch_rows == len(prompts) * ROWS
  for e in range(2):
    rows = _epoch(order, e)
    assert sorted(rows) == sorted((p, r) for p in prompts for r in range(ROWS))
  assert _epoch(order, 0) != _epoch(order, 1)


def test_full_dataset_expert_draws_one_template_per_row_per_epoch(quarel):
  order = row_order.epoch_order(mixtures.random_prompt_mixture("quarel"), "train", BATCH, seed=3)
  templates = [m.name for m in order.members]
  assert order.order == "template_per_row" and order.epoch_rows == ROWS
  assert "elm_fde_quarel_label_dependent" not in templates  # 15 of 40 rows: not alignable
  assert sorted(templates) == sorted(f"elm_fde_{p}" for p in quarel["prompt_experts"])
  drawn = []
  for e in range(3):
    rows = _epoch(order, e)
    assert sorted(r for _, r in rows) == list(range(ROWS))  # each row once, under one template
    drawn.append(dict((r, t) for t, r in rows))
  assert len({t for d in drawn for t in d.values()}) == len(templates)
  assert drawn[0] != drawn[1]  # a new template per row each epoch


def _batches(task, *, rows=slice(None), start_step=0, steps, tokens=False):
  """The row ids (or, with `tokens`, the encoder inputs [rows, 6]) of each of `steps` batches."""
  config = TrainConfig(model_dir="/nonexistent", expert_tasks=(task,), steps=steps, batch_size=BATCH,
                       input_length=6, target_length=3)
  stream = inputs.expert_batches(config, rows=rows, start_step=start_step)
  batches = [next(stream)["encoder_input_tokens"][0] for _ in range(steps)]
  return batches if tokens else [b[:, 0] - 10 for b in batches]


@pytest.mark.parametrize("which", ["prompt", "adapter_de", "full_de"])
def test_pipeline_reads_the_order_on_any_process_count_and_after_a_resume(quarel, which):
  task = {"prompt": mixtures.prompt_expert_task(quarel["prompt_experts"][1]),
          "adapter_de": mixtures.dataset_expert_mixture("quarel"),
          "full_de": mixtures.random_prompt_mixture("quarel")}[which]
  steps = 12  # past the first epoch (5 steps for 40 rows, 25 for the adapter expert's 200)
  whole = _batches(task, steps=steps)
  seed = TrainConfig(model_dir="", expert_tasks=(task,), steps=1).expert_seeds()[0]
  order = row_order.epoch_order(task, "train", BATCH, seed)
  for s, batch in enumerate(whole):
    assert batch.tolist() == [-10 if r is None else r[1] for r in order.split_rows(s)]
  halves = zip(_batches(task, rows=slice(0, 4), steps=steps), _batches(task, rows=slice(4, 8), steps=steps))
  assert [np.concatenate(h).tolist() for h in halves] == [b.tolist() for b in whole]
  resumed = _batches(task, start_step=7, steps=steps - 7)
  assert [b.tolist() for b in resumed] == [b.tolist() for b in whole[7:]]


def test_continual_expert_reads_its_capped_sample_in_epochs(tmp_path):
  """A continual expert (rows from a JSON file, cut to its cap when registered) is read the same
  way: every row once per epoch, the same batches on 2 processes and after a resume."""
  train = tmp_path / "train.jsonl"
  train.write_text("".join(f'{{"source": "row {i}", "target": "{i < 12}"}}\n' for i in range(24)))
  spm = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")
  name = continual.register_continual_task("test_row_order_continual", {"train": str(train)},
                                           seqio.SentencePieceVocabulary(spm))
  order = row_order.epoch_order(name, "train", BATCH, seed=1)
  for e in range(2):
    assert sorted(r for _, r in _epoch(order, e)) == list(range(24))
  assert _epoch(order, 0) != _epoch(order, 1)
  tokens = lambda **kw: [b.tolist() for b in _batches(name, tokens=True, **kw)]  # noqa: E731
  whole = tokens(steps=7)
  assert tokens(start_step=4, steps=3) == whole[4:]
  halves = zip(tokens(rows=slice(0, 4), steps=7), tokens(rows=slice(4, 8), steps=7))
  assert [a + b for a, b in halves] == whole


def test_t0_mixture_keeps_its_rates_and_resumes(quarel):
  """T0's mixture is not epoch-ordered: members drawn at their rates, each read as a stream; a
  run restarted at a step reads what the uninterrupted run read from there, on 1 or 2 processes."""
  assert row_order.order_of("t0_train") == "rates"
  whole = _batches("t0_train", steps=6)
  assert [b.tolist() for b in _batches("t0_train", start_step=4, steps=2)] == [b.tolist() for b in whole[4:]]
  halves = zip(_batches("t0_train", rows=slice(0, 4), steps=6), _batches("t0_train", rows=slice(4, 8), steps=6))
  assert [np.concatenate(h).tolist() for h in halves] == [b.tolist() for b in whole]
