"""`expert_eval.evaluate_tasks`: several tasks' rank-classification examples scored in one pass
give each task the same result as evaluating it alone; generation tasks are decoded; results
keep the order of the tasks asked for."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_decoding, expert_eval
from elm_jax.expert_stack import ExpertsOnBackbone, ExpertStack
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from tasks import builtin_registry, instances

# Inputs of different lengths and 2, 3 and 4 choices: several batch shapes across the tasks.
RANK = ["builtin_coreference_who_is_pronoun_score_eval", "builtin_sentence_completion_how_ends_score_eval",
        "builtin_mc_reading_why_question_score_eval"]
GENERATION = "builtin_reverse_words_reverse_order"


@pytest.fixture(scope="module")
def loaded():
  builtin_registry.register_builtin_suite(num_train=40, num_eval=12)
  config = T5Config(vocab_size=builtin_registry.VOCAB_SIZE, emb_dim=32, num_heads=4, head_dim=8,
                    mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
  expert_config = ExpertConfig(kind="adapter", reduction_factor=4)
  experts = []
  for seed in range(3):
    full = nn.unbox(init_params(config, jax.random.PRNGKey(seed), expert=expert_config))
    backbone, expert = split_params(full, expert_config)
    # Distinct adapters (random up-projections) on one shared backbone.
    experts.append(jax.tree_util.tree_map(lambda x, s=seed: np.asarray(x) + 0.05 * s, expert))
  return ExpertsOnBackbone(EncoderDecoderModel.build(config, expert_config), backbone,
                           ExpertStack.from_trees(["a", "b", "c"], experts, expert_config),
                           builtin_registry.builtin_vocabulary())


def _kwargs():
  return dict(max_examples=12, batch_size=4, max_input_length=128, max_target_length=16)


def test_tasks_together_equal_tasks_alone(loaded):
  together = expert_eval.evaluate_tasks(loaded, RANK + [GENERATION], max_decode_length=8, **_kwargs())
  assert [r.task for r in together] == RANK + [GENERATION]
  assert [r.evaluation for r in together] == ["rank"] * 3 + ["generation"]
  for result in together[:3]:
    alone = expert_eval.evaluate_task(loaded, result.task, **_kwargs())
    assert result.examples == alone.examples == 12
    assert result.metrics == alone.metrics
    assert result.predictions == alone.predictions
  # The experts differ, so they are not all scored alike (the test would not see a mix-up).
  assert len({tuple(p["predictions"].values()) for r in together[:3] for p in r.predictions}) > 1
  generation = together[3]
  alone = expert_eval.evaluate_task(loaded, GENERATION, **dict(_kwargs(), max_target_length=8))
  assert generation.predictions == alone.predictions and generation.metrics == alone.metrics


def test_unscorable_task_is_refused_before_scoring(loaded, monkeypatch):
  real = instances.task_instances
  monkeypatch.setattr(instances, "task_instances",
                      lambda task, split, n: [dict(r, targets=None) for r in real(GENERATION, split, n)]
                      if task == "broken" else real(task, split, n))
  with pytest.raises(UserInputError, match=r"task 'broken' \(validation\): examples carry neither"):
    expert_eval.evaluate_tasks(loaded, RANK[:1] + ["broken"], **_kwargs())


def test_each_expert_reads_inputs_cut_at_its_own_source_length(loaded):
  """The paper's evaluation cuts an expert's inputs at the source length it was trained with:
  experts of different lengths are scored in one pass per length, each as if alone with that
  `max_input_length` (EOS kept), and decoded likewise."""
  import dataclasses
  mixed = dataclasses.replace(loaded, source_lengths={"a": 16, "b": None, "c": 16})
  assert mixed.input_length_groups(128) == [(16, [0, 2]), (128, [1])]
  rows = instances.task_instances(RANK[1], "validation", 12)
  assert max(len(loaded.vocabulary().encode(r["inputs"])) for r in rows) > 16  # the cut bites
  scores, _ = expert_eval.score_instances(mixed, rows, batch_size=4, max_input_length=128, max_target_length=16)
  short, _ = expert_eval.score_instances(loaded, rows, batch_size=4, max_input_length=16, max_target_length=16)
  full, _ = expert_eval.score_instances(loaded, rows, batch_size=4, max_input_length=128, max_target_length=16)
  # Expert b is scored in a chunk of its own here and beside a and c there: the same sums in
  # another vmapped program, equal up to float32 rounding (a few ulps of scores of ~40).
  np.testing.assert_allclose(scores[[0, 2]], short[[0, 2]], rtol=1e-6)
  np.testing.assert_allclose(scores[1], full[1], rtol=1e-6)
  assert not np.array_equal(short[0], full[0])
  inputs = [r["inputs"] for r in rows[:4]]
  texts = expert_decoding.decode_texts(mixed, inputs, batch_size=4, max_input_length=128, max_decode_length=4)
  alone = expert_decoding.decode_texts(loaded, inputs, batch_size=4, max_input_length=16, max_decode_length=4)
  assert texts[0] == alone[0] and texts[2] == alone[2]


def test_results_json_keeps_the_evaluation_under_its_key_kind():
  """results.json's task entries are as every earlier version wrote them: the evaluation
  (`TaskResult.evaluation`) under "kind", the predictions left to predictions/."""
  result = expert_eval.TaskResult("t", "d", "p", "generation", 1, {"e": {"rougeL": 50.0}},
                                  [{"index": 0, "target": "x", "predictions": {"e": "x"}}])
  assert result.primary == "rougeL"
  report = json.loads(expert_eval.report_bytes([result], ["e"], {})["results.json"])
  assert report["tasks"] == [{"task": "t", "dataset": "d", "prompt": "p", "kind": "generation", "examples": 1,
                              "metrics": {"e": {"rougeL": 50.0}}}]
