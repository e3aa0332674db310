"""A library holding experts of several kinds: `load_experts` stacks them once (each expert
holding the other kinds' identities and the pretrained values of what it does not train), the
one-pass scorer scores them together as each scores alone, and `merge` refuses to mix them."""

import dataclasses

import jax
import numpy as np
import pytest

from elm_jax.checkpoints import expert_files, hf
from elm_jax.errors import UserInputError
from elm_jax.evaluation import rank_scoring
from elm_jax.library import merge_and_add
from elm_jax.library.loaded import load_experts
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.experts import ExpertConfig, ExpertSet
from elm_jax.models.model import EncoderDecoderModel

CONFIGS = {"an_adapter": ExpertConfig(kind="adapter", reduction_factor=4),
           "a_lora": ExpertConfig(kind="lora", lora_rank=2, train_layer_norms=False),
           "a_lora_with_norms": ExpertConfig(kind="lora", lora_rank=2)}
EXAMPLES = [rank_scoring.Example([5, 9, 13, 2, 7], [[3, 6], [7], [8, 8, 4]]),
            rank_scoring.Example([4, 4, 8], [[9], [2, 5]])]


@pytest.fixture(scope="module")
def library(tiny_config, tmp_path_factory):
  """(library root, backbone checkpoint): an adapter and two LoRA experts (one trains the
  layer norms), moved off their initial values, over a random backbone saved as a Hugging Face
  checkpoint."""
  root = tmp_path_factory.mktemp("mixed")
  pretrained = EncoderDecoderModel.build(tiny_config).init_params(jax.random.PRNGKey(0))
  checkpoint = str(root / "backbone")
  hf.save_hf_checkpoint(pretrained, tiny_config, checkpoint)
  fingerprint = expert_files.backbone_fingerprint(pretrained)
  library = ExpertLibrary(str(root / "lib"), create=True)
  for seed, (name, config) in enumerate(CONFIGS.items()):
    _, stacked = EncoderDecoderModel.build(tiny_config, config).init_experts(pretrained, 1, seed=seed)
    rng = np.random.default_rng(seed)
    tree = jax.tree_util.tree_map(lambda x: x[0] + 0.2 * rng.standard_normal(x.shape[1:]).astype(np.float32),
                                  stacked)
    meta = expert_files.ExpertMetadata(name=name, task="t", expert_config=dataclasses.asdict(config),
                                       backbone_fingerprint=fingerprint,
                                       training_config={"model": dataclasses.asdict(tiny_config)})
    expert_files.save_expert(str(root / name), tree, meta)
    library.add(str(root / name))
  return str(root / "lib"), checkpoint


def _scores(loaded):
  return rank_scoring.score_all_experts(loaded.model, loaded.backbone, loaded.stack.params, EXAMPLES,
                                        batch_size=2)[0]


def test_experts_of_two_kinds_load_as_one_stack_and_score_as_each_alone(library):
  root, checkpoint = library
  loaded = load_experts(root, ["an_adapter", "a_lora"], checkpoint=checkpoint)
  assert loaded.stack.expert_config == ExpertSet.of([CONFIGS["an_adapter"], CONFIGS["a_lora"]])
  together = _scores(loaded)
  for e, name in enumerate(["an_adapter", "a_lora"]):
    alone = load_experts(root, [name], checkpoint=checkpoint)
    assert alone.stack.expert_config == CONFIGS[name]
    # The other kind's module at its identity adds exact zeros; float32 rounding of the two
    # programs otherwise (scores up to ~20).
    np.testing.assert_allclose(together[e], _scores(alone)[0], rtol=1e-6, atol=1e-5)
  real = np.isfinite(together[0])  # -inf where an example has fewer choices
  assert np.abs(together[0][real] - together[1][real]).max() > 1e-3


def test_two_configurations_of_one_kind_are_refused_together(library):
  root, checkpoint = library
  with pytest.raises(UserInputError, match="experts of kind 'lora' with two configurations"):
    load_experts(root, ["a_lora", "a_lora_with_norms"], checkpoint=checkpoint)


def test_merge_refuses_experts_of_several_kinds(library):
  root, checkpoint = library
  lib = ExpertLibrary(root)
  with pytest.raises(UserInputError, match=r"experts \['an_adapter', 'a_lora_with_norms'\]: they are of several "
                                           r"kinds \(adapter\+lora\); merge experts of one kind"):
    merge_and_add.merge_into_library(lib, ["an_adapter", "a_lora_with_norms"], "mix", checkpoint=checkpoint)
  # Stacked without the backbone (as merge loads them), the LoRA expert lacks the layer norms.
  with pytest.raises(UserInputError, match="experts 'a_lora' and 'an_adapter' have different configurations, "
                                           "and only the second trains"):
    merge_and_add.merge_into_library(lib, ["a_lora", "an_adapter"], "mix", checkpoint=checkpoint)
  assert "mix" not in lib.names()
