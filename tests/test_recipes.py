"""The full-replication recipes (gin_configs/experiments/) parse and build their models at tiny scale."""

import glob
import os

import flax.linen as nn
import gin
import jax
import pytest

from elm_jax import partitioning
from elm_jax.commands import gin_utils
from elm_jax.models.adapters import ExpertConfig, count_parameters, split_params
from elm_jax.models.t5 import init_params
from elm_jax.training import plans

EXPERIMENTS = sorted(glob.glob(os.path.join(gin_utils.GIN_CONFIGS_DIR, "experiments", "*.gin")))
TINY = ["t5_config.T5Config.emb_dim = 32", "t5_config.T5Config.num_heads = 4", "t5_config.T5Config.head_dim = 8",
        "t5_config.T5Config.mlp_dim = 64", "t5_config.T5Config.num_encoder_layers = 2",
        "t5_config.T5Config.num_decoder_layers = 2", "t5_config.T5Config.vocab_size = 320",
        "t5_config.T5Config.softmax_vocab_size = None", "MODEL_DIR = '/tmp/unused'"]


def test_every_experiment_file_is_covered():
  assert {os.path.basename(p) for p in EXPERIMENTS} == {
      "elm_prompt_experts_xl.gin", "elm_dataset_experts_xl.gin", "elm_dataset_experts_full_xl.gin",
      "t0_multitask_xl.gin", "elm_continual_experts_xl.gin", "flan_moe_t0_xl.gin"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_recipe_parses_and_builds_a_tiny_model(path):
  gin_utils.parse_gin(gin_utils.GinFlags(files=[path], bindings=TINY))
  config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  name = os.path.basename(path)
  elm = name.startswith("elm_")
  # The paper's expert runs were float32; the T0 / MoE baselines use bfloat16 activations.
  assert config.emb_dim == 32 and config.dtype == ("float32" if elm else "bfloat16")
  assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding  # XL's v1.1 shape
  assert config.dropout_rate == 0.1
  kind = gin.query_parameter("adapters.ExpertConfig.kind")
  kind = gin.query_parameter("%EXPERT_KIND") if not isinstance(kind, str) else kind
  expert = ExpertConfig(kind=kind, reduction_factor=4)
  params = nn.unbox(init_params(config, jax.random.PRNGKey(0), expert=expert))
  _, trained = split_params(params, expert)
  assert count_parameters(trained) > 0
  mesh = gin.query_parameter("%MESH_CONFIG").scoped_configurable_fn()
  assert mesh.resolve(32)[0] * mesh.resolve(32)[1] * mesh.resolve(32)[2] == 32  # a v4-64's 32 chips
  if elm:
    group = gin.query_parameter("run.train.plan_group").scoped_configurable_fn()
    recipe = {"elm_prompt_experts_xl.gin": "prompt", "elm_dataset_experts_xl.gin": "dataset",
              "elm_dataset_experts_full_xl.gin": "dataset_full",
              "elm_continual_experts_xl.gin": "continual"}[name]
    assert group.recipe == recipe and group.plans == tuple(plans.recipe_groups(recipe, group.group_size)[0])
    assert kind == ("full" if recipe == "dataset_full" else "adapter")
    if recipe == "prompt":
      assert mesh.resolve(8) == (1, 8, 1)  # 8 GPUs: one expert per GPU
  else:
    tasks = gin.query_parameter("%EXPERT_TASKS")
    assert tasks == ["t0_train"] and kind == "full"
  if "moe" in os.path.basename(path):
    assert config.moe.num_experts == 8 and config.moe.num_selected_experts == 1
    assert gin.query_parameter("run.train.upcycle") is True
    assert mesh.resolve(32) == (4, 8, 1) and mesh.resolve(8) == (1, 8, 1)
    assert len(params["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]) == 8
  else:
    assert config.moe is None


def test_prompt_recipe_mesh():
  # The recipe's mesh on a v4-64 (32 chips): 4-way data parallel, 8 experts at a time.
  assert partitioning.MeshConfig(data=-1, expert=8, model=1).resolve(32) == (4, 8, 1)


MOE_MODELS = sorted(glob.glob(os.path.join(gin_utils.GIN_CONFIGS_DIR, "models", "moe", "t5_1_1_*.gin")))


def test_moe_model_files_cover_every_size_and_router():
  names = {os.path.basename(p) for p in MOE_MODELS}
  assert names == {f"t5_1_1_{size}_{router}.gin" for size in ("small", "base", "large", "xl")
                   for router in ("switch", "top2", "expert_choice")}


@pytest.mark.parametrize("path", MOE_MODELS, ids=os.path.basename)
def test_moe_model_file_builds_a_tiny_model(path):
  gin_utils.parse_gin(gin_utils.GinFlags(files=[path], bindings=TINY[:-1]))
  config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  router = os.path.basename(path)[:-4].split("_", 4)[-1]
  want = {"switch": ("top_k", 1), "top2": ("top_k", 2), "expert_choice": ("expert_choice", 1)}[router]
  assert (config.moe.router, config.moe.num_selected_experts) == want
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  kernel = shapes["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
  assert kernel.value.shape == (8, 64, 32)


def test_t0_baseline_has_t0s_published_settings():
  """The settings experiments/t0_multitask_xl.gin says it checked against T0's training command
  (t-zero training/README.md) and model cards, Adafactor as Mesh TensorFlow applies it."""
  path = os.path.join(gin_utils.GIN_CONFIGS_DIR, "experiments", "t0_multitask_xl.gin")
  gin_utils.parse_gin(gin_utils.GinFlags(files=[path], bindings=TINY))
  macros = {m: gin.query_parameter(f"%{m}") for m in
            ("TRAIN_STEPS", "BATCH_SIZE", "INPUT_LENGTH", "TARGET_LENGTH", "LEARNING_RATE")}
  assert macros == {"TRAIN_STEPS": 12_200, "BATCH_SIZE": 1024, "INPUT_LENGTH": 1024, "TARGET_LENGTH": 256,
                    "LEARNING_RATE": 1e-3}
  optimizer = {k: gin.query_parameter(f"train_step.OptimizerConfig.{k}") for k in
               ("name", "schedule", "max_grad_norm", "multiply_by_parameter_scale")}
  assert optimizer == {"name": "adafactor", "schedule": "constant", "max_grad_norm": None,
                       "multiply_by_parameter_scale": True}
  assert gin.query_parameter("t5_config.T5Config.dropout_rate") == 0.1
