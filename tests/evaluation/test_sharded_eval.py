"""The evaluating commands on a mesh of 8 fake CPU devices (`evaluation/placement.py`): rank
classification, generation, `score --library` and `retrieve --method=likelihood` with experts
split 4 ways x data 2 and 2 ways x model 4 give one device's results (float32 scores within a
tolerance scaled to their size; predictions equal), and the expert stack really is split over
the `expert` axis (the shardings of what the scorer and the decoder put on the devices)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax import expert_stack, partitioning
from elm_jax.evaluation import expert_decoding, expert_eval, placement
from elm_jax.expert_stack import ExpertsOnBackbone, ExpertStack
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params
from elm_jax.models.t5_config import T5Config
from tasks import builtin_registry, instances
from tests.hostile.harness import run_command, train_args

RANK = ["builtin_coreference_who_is_pronoun_score_eval", "builtin_nli_gpt3_style_score_eval"]
GENERATION = "builtin_reverse_words_reverse_order"
MESHES = {"expert4_data2": partitioning.MeshConfig(data=2, expert=4, model=1),
          "expert2_model4": partitioning.MeshConfig(data=1, expert=2, model=4)}
# Scores of one device and of a mesh differ by float32 rounding (sums split differently over
# devices): a few ulps of the per-token log-probabilities, summed over at most ~20 tokens.
RTOL = 1e-5


@pytest.fixture(scope="module")
def loaded():
  builtin_registry.register_builtin_suite(num_train=40, num_eval=8)
  config = T5Config(vocab_size=builtin_registry.VOCAB_SIZE, emb_dim=32, num_heads=4, head_dim=8,
                    mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
  expert_config = ExpertConfig(kind="adapter", reduction_factor=4)
  experts = []
  for seed in range(4):
    full = nn.unbox(init_params(config, jax.random.PRNGKey(seed), expert=expert_config))
    backbone, expert = split_params(full, expert_config)
    experts.append(jax.tree_util.tree_map(lambda x, s=seed: np.asarray(x) + 0.05 * s, expert))
  return ExpertsOnBackbone(EncoderDecoderModel.build(config, expert_config), backbone,
                           ExpertStack.from_trees(["a", "b", "c", "d"], experts, expert_config),
                           builtin_registry.builtin_vocabulary())


@pytest.fixture
def placed(monkeypatch):
  """Records every expert chunk placed on the devices."""
  seen = []
  real = expert_stack.place

  def recording(params, partitioner=None, specs=None):
    out = real(params, partitioner, specs)
    seen.append((out, partitioner))
    return out
  monkeypatch.setattr(expert_stack, "place", recording)
  return seen


def _assert_split(seen, ways: int) -> None:
  assert seen, "no expert chunk was placed"
  for tree, partitioner in seen:
    assert partitioner is not None and partitioner.mesh.shape["expert"] == ways
    assert placement.is_split_over_experts(tree, ways)
    for leaf in jax.tree_util.tree_leaves(tree):
      assert len(leaf.sharding.device_set) == 8


def _close(a, b) -> None:
  finite = np.isfinite(a)
  assert (finite == np.isfinite(b)).all()
  np.testing.assert_allclose(a[finite], b[finite], rtol=RTOL, atol=RTOL * np.abs(a[finite]).max())


@pytest.mark.parametrize("mesh", list(MESHES), ids=list(MESHES))
def test_rank_and_generation_on_a_mesh_equal_one_device(loaded, placed, mesh):
  rows = [r for t in RANK for r in instances.task_instances(t, "validation", 8)]
  kwargs = dict(batch_size=4, max_input_length=128, max_target_length=16)
  one, _ = expert_eval.score_instances(loaded, rows, **kwargs)
  partitioner = partitioning.Partitioner(MESHES[mesh])
  placed.clear()
  sharded, _ = expert_eval.score_instances(loaded, rows, partitioner=partitioner, expert_chunk=4, **kwargs)
  _assert_split(placed, MESHES[mesh].expert)
  _close(one, sharded)
  assert (one.argmax(-1) == sharded.argmax(-1)).mean() > 0.99
  inputs = [r["inputs"] for r in instances.task_instances(GENERATION, "validation", 4)]
  texts_one = expert_decoding.decode_texts(loaded, inputs, batch_size=4, max_input_length=64, max_decode_length=6)
  placed.clear()
  texts_mesh = expert_decoding.decode_texts(loaded, inputs, batch_size=4, max_input_length=64, max_decode_length=6,
                                        partitioner=partitioner, expert_chunk=4)
  _assert_split(placed, MESHES[mesh].expert)
  assert texts_mesh == texts_one


def test_auto_mesh_puts_every_device_on_experts_when_they_fill_them():
  assert placement.auto_mesh(16, 32, 8) == partitioning.MeshConfig(data=1, expert=8, model=1)
  assert placement.auto_mesh(2, 4, 8) == partitioning.MeshConfig(data=4, expert=2, model=1)
  assert placement.auto_mesh(3, 4, 8) == partitioning.MeshConfig(data=4, expert=2, model=1)
  assert placement.auto_mesh(1, 3, 8) == partitioning.MeshConfig(data=1, expert=8, model=1)


def test_the_chunk_follows_the_devices_memory(loaded):
  per_expert = placement.scoring_bytes_per_expert(loaded.config, loaded.stack.params, batch_size=32,
                                                  input_length=512, target_length=128)
  assert placement.experts_per_device(None, 10**9, per_expert, 1) == 2  # CPU: no limit reported
  assert placement.experts_per_device(80 * 2**30, 11 * 2**30, 2 * 2**30, 1) == 27  # 0.8 x 69 GiB / 2 GiB
  assert placement.experts_per_device(16 * 2**30, 15 * 2**30, 2**31, 1) == 1


# ------------------------------------------------------------------ the commands, on a library
@pytest.fixture(scope="module")
def library(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  tasks = ["builtin_sentiment_is_positive", "builtin_topic_which_topic", "builtin_antonyms_opposite_of",
           "builtin_nli_gpt3_style"]
  assert run_command(train_args(root / "run", tasks)) == 0
  assert run_command(["library", "add", f"--library={root / 'lib'}", "--keys=none", str(root / "run")]) == 0
  (root / "in.jsonl").write_text("".join(
      json.dumps({"id": i, "inputs": f"Review {i}: a fine film. Positive?", "choices": ["yes", "no", "maybe"]}) + "\n"
      for i in range(6)))
  return root


MESH_FLAGS = {"one_device": "data:1,expert:1,model:1", "expert4_data2": "data:2,expert:4",
              "expert2_model4": "expert:2,model:4"}


def _run_all(library, out, mesh: str, capsys) -> dict:
  lib = library / "lib"
  assert run_command(["eval", f"--library={lib}", "--task=builtin_held_out", f"--output_dir={out / 'eval'}",
                "--max_examples=4", "--batch_size=4", "--no_progress", f"--mesh={mesh}"]) == 0
  assert run_command(["eval", f"--library={lib}", f"--task={GENERATION}", f"--output_dir={out / 'gen'}",
                "--max_examples=4", "--batch_size=4", "--max_target_length=6", "--no_progress",
                f"--mesh={mesh}"]) == 0
  assert run_command(["score", f"--library={lib}", f"--input={library / 'in.jsonl'}", f"--output={out / 's.jsonl'}",
                "--batch_size=4", f"--mesh={mesh}"]) == 0
  assert run_command(["retrieve", f"--library={lib}", "--task=builtin_nli_can_we_infer_score_eval", "--method=likelihood",
                "--num_queries=8", "--batch_size=4", "--top_k=4", f"--output={out / 'r.json'}", f"--mesh={mesh}"]) == 0
  err = capsys.readouterr().err
  return {"eval": json.load(open(out / "eval" / "results.json"))["tasks"],
          "gen": json.load(open(out / "gen" / "results.json"))["tasks"],
          "score": [json.loads(line) for line in open(out / "s.jsonl")],
          "retrieve": json.load(open(out / "r.json"))["ranking"], "err": err}


def test_commands_on_a_mesh_equal_one_device(library, tmp_path, capsys, placed):
  runs = {}
  for name, flag in MESH_FLAGS.items():
    placed.clear()
    runs[name] = _run_all(library, tmp_path / name, flag, capsys)
    if name != "one_device":  # every chunk eval, score and retrieve put on the devices was split
      _assert_split(placed, int(flag.split("expert:")[1].split(",")[0]))
  one = runs.pop("one_device")
  assert "eval: 1 cpu device" in one["err"]
  for name, run in runs.items():
    assert {"expert4_data2": "2 data x 4 expert x 1 model", "expert2_model4": "1 data x 2 expert x 4 model"}[name] in run["err"]
    for a, b in zip(one["eval"], run["eval"]):
      assert a["metrics"] == b["metrics"], name  # accuracies of 4 examples: no near ties here
    assert one["gen"] == run["gen"]
    for a, b in zip(one["score"], run["score"]):
      assert a["prediction"] == b["prediction"]
      for expert in a["scores"]:
        _close(np.asarray(a["scores"][expert]), np.asarray(b["scores"][expert]))
    entropy = lambda ranking: {e["expert"]: e["entropy"] for e in ranking}  # noqa: E731
    a, b = entropy(one["retrieve"]), entropy(run["retrieve"])
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[e] for e in sorted(a)], [b[e] for e in sorted(a)], rtol=RTOL)
