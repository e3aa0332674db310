"""(IA)^3 experts (`models/experts/ia3.py`): the parameter layout, scales that start at 1 and
rescale the keys, values and feed-forward activations; trained next to an adapter and a LoRA
expert, scored with them in one pass from one library, and merged by task arithmetic from 1."""


import gin
import jax
import numpy as np
import pytest

from elm_jax import tree_paths
from elm_jax.checkpoints import hf
from elm_jax.commands import gin_utils
from elm_jax.evaluation import rank_scoring
from elm_jax.library import merge_and_add, merging
from elm_jax.library.loaded import load_experts
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.experts import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.training import train_step as ts
from elm_jax.training import trainer
from tests.helpers import word_tasks

IA3 = ExpertConfig(kind="ia3", train_layer_norms=False)
ATTENTIONS = {"encoder": ("attention",), "decoder": ("self_attention", "encoder_decoder_attention")}
ENC = np.array([[5, 9, 13, 2, 7, 1, 0, 0], [4, 4, 8, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[[3, 6, 1], [7, 1, 0]], [[9, 1, 0], [2, 5, 1]]], np.int32)


def _expected_layout(config):
  """{path: (shape, logical axes)} of the fixed layout: scales beside the kernels they scale."""
  joined = config.num_heads * config.head_dim
  out = {}
  for stack, attentions in ATTENTIONS.items():
    for i in range(2):
      for attention in attentions:
        for projection in ("key", "value"):
          out[f"{stack}/layers_{i}/{attention}/{projection}/ia3_scale"] = ((joined,), ("joined_kv",))
      out[f"{stack}/layers_{i}/mlp/wo/ia3_scale"] = ((config.mlp_dim,), ("mlp",))
  return out


def test_the_parameter_layout(tiny_config):
  model = EncoderDecoderModel.build(tiny_config, IA3)
  want = _expected_layout(tiny_config)
  assert {p: s.shape for p, s in model.expert_shapes().items()} == {p: shape for p, (shape, _) in want.items()}
  _, specs = model.expert_specs()
  flat = tree_paths.flatten(specs)
  assert {tree_paths.join(p): tuple(s) for p, s in flat.items()} == {p: ("expert",) + axes
                                                                      for p, (_, axes) in want.items()}
  with_norms = EncoderDecoderModel.build(tiny_config, ExpertConfig(kind="ia3")).expert_shapes()
  assert set(with_norms) - set(want) == {p for p in with_norms if p.endswith("/scale")}


def test_scales_start_at_one_and_scale_keys_values_and_the_feed_forward_input(tiny_config):
  model, plain = EncoderDecoderModel.build(tiny_config, IA3), EncoderDecoderModel.build(tiny_config)
  params = model.init_params(jax.random.PRNGKey(0))
  backbone, expert = model.split_params(params)
  assert all((v == 1).all() for v in jax.tree_util.tree_leaves(expert))
  score = jax.jit(model.choice_log_likelihoods)
  np.testing.assert_array_equal(np.asarray(score(params, ENC, TARGETS)),
                                np.asarray(jax.jit(plain.choice_log_likelihoods)(backbone, ENC, TARGETS)))
  # Random scales act as the backbone with its key and value kernels' columns, and wo's rows, scaled.
  rng = np.random.default_rng(1)
  scales = {p: (1 + 0.5 * rng.standard_normal(np.shape(v))).astype(np.float32)
            for p, v in tree_paths.flatten(expert).items()}
  scaled = tree_paths.flatten(backbone)
  for path, scale in scales.items():
    kernel = path[:-1] + ("kernel",)
    scaled[kernel] = scaled[kernel] * (scale[:, None] if path[-2] == "wo" else scale[None, :])
  got = np.asarray(score(merge_params(backbone, tree_paths.unflatten(scales)), ENC, TARGETS))
  want = np.asarray(jax.jit(plain.choice_log_likelihoods)(tree_paths.unflatten(scaled), ENC, TARGETS))
  np.testing.assert_array_equal(got, want)  # the same products, formed in the same order
  assert np.abs(got - np.asarray(score(params, ENC, TARGETS))).max() > 1e-2


def test_the_gin_file_makes_ia3_experts():
  gin_utils.parse_gin(gin_utils.GinFlags(files=["models/t5_1_1_tiny.gin", "runs/train_experts.gin",
                                                "experts/ia3.gin"], bindings=["MODEL_DIR = '/tmp/x'"]))
  try:
    bound = {f: gin.query_parameter(f"adapters.ExpertConfig.{f}") for f in ("kind", "train_layer_norms")}
    assert ExpertConfig(**bound) == IA3
    assert gin.query_parameter("%LEARNING_RATE") == 3e-3
  finally:
    gin.clear_config()


# ------------------------------------------------------------------ next to other kinds
@pytest.fixture(scope="module")
def library(tiny_config, tmp_path_factory):
  """(library root, backbone checkpoint): an adapter, a LoRA and two IA3 experts trained a few
  steps over one random backbone (a Hugging Face checkpoint), added to one library."""
  root = tmp_path_factory.mktemp("ia3")
  word_tasks.register("test_ia3", count=32)
  pretrained = EncoderDecoderModel.build(tiny_config).init_params(jax.random.PRNGKey(0))
  checkpoint = str(root / "backbone")
  hf.save_hf_checkpoint(pretrained, tiny_config, checkpoint)
  runs = {"adapter": (ExpertConfig(reduction_factor=4), {"an_adapter": "test_ia3_reverse"}),
          "lora": (ExpertConfig(kind="lora", lora_rank=2), {"a_lora": "test_ia3_first"}),
          "ia3": (IA3, {"ia3_reverse": "test_ia3_reverse", "ia3_first": "test_ia3_first"})}
  library = ExpertLibrary(str(root / "lib"), create=True)
  for run, (expert_config, experts) in runs.items():
    config = trainer.TrainConfig(model_dir=str(root / run), expert_tasks=tuple(experts.values()),
                                 expert_names=tuple(experts), steps=4, batch_size=4, input_length=16,
                                 target_length=8, save_every=4, log_every=4, backbone_checkpoint=checkpoint)
    trainer.train_experts(config, tiny_config, pretrained, expert_config=expert_config, progress=False,
                          optimizer_config=ts.OptimizerConfig(learning_rate=3e-2))
    for name in experts:
      library.add(config.expert_dir(name))
  return str(root / "lib"), checkpoint


EXAMPLES = [rank_scoring.Example([5, 9, 13, 2, 7], [[3, 6], [7], [8, 8, 4]]),
            rank_scoring.Example([4, 4, 8], [[9], [2, 5]])]


def _scores(loaded):
  return rank_scoring.score_all_experts(loaded.model, loaded.backbone, loaded.stack.params, EXAMPLES,
                                        batch_size=2)[0]


def test_three_kinds_in_one_library_score_in_one_pass_as_alone(library):
  root, checkpoint = library
  names = ["an_adapter", "a_lora", "ia3_reverse", "ia3_first"]
  loaded = load_experts(root, names, checkpoint=checkpoint)
  assert loaded.stack.expert_config.label == "adapter+ia3+lora"
  together = _scores(loaded)  # one vmapped pass per batch over the four experts
  alone = np.concatenate([_scores(load_experts(root, group, checkpoint=checkpoint))
                          for group in (["an_adapter"], ["a_lora"], ["ia3_reverse", "ia3_first"])])
  # Each other kind's module at its identity adds exact zeros or scales by exactly 1; the two
  # programs may still be fused differently: float32 rounding of scores up to ~20.
  np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-5)
  real = np.isfinite(together[0])
  assert min(np.abs(together[i][real] - together[j][real]).max() for i in range(4) for j in range(i)) > 1e-4


def test_ia3_experts_merge_by_task_arithmetic_from_one(library):
  root, checkpoint = library
  lib = ExpertLibrary(root)
  members = [lib.load(name)[0] for name in ("ia3_reverse", "ia3_first")]
  base = merging.identity_base(members[0], IA3)
  assert all((v == 1).all() for v in jax.tree_util.tree_leaves(base))
  merge_and_add.merge_into_library(lib, ["ia3_reverse", "ia3_first"], "ia3_sum", "task_arithmetic", scale=0.7,
                            checkpoint=checkpoint)
  tensors, meta = lib.load("ia3_sum")
  assert meta.expert_config["kind"] == "ia3"
  got, flats = tree_paths.flatten(tensors), [tree_paths.flatten(m) for m in members]
  assert sorted(got) == sorted(flats[0]) and all(p[-1] == "ia3_scale" for p in got)
  for path, value in got.items():
    l1, l2 = (np.asarray(f[path], np.float64) for f in flats)
    np.testing.assert_allclose(value, 1.0 + 0.7 * ((l1 - 1.0) + (l2 - 1.0)), rtol=1e-6, err_msg=str(path))
  moved = np.concatenate([np.abs(np.asarray(v) - 1.0).ravel() for v in got.values()])
  assert moved.max() > 1e-3  # training moved the scales off 1
