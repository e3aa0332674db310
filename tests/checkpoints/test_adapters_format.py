"""Bottleneck adapters to and from the `adapters` package's (AdapterHub) folders
(elm_jax/checkpoints/adapters_format.py).

The golden tests/golden/interchange/adapters_bn was made by tools/make_interchange_goldens.py
with the `adapters` package (version in reference.json): a Houlsby `DoubleSeqBnConfig`
adapter (reduction factor 8, gelu_new) on the tiny T5 v1.1 of tests/golden/t5_v1_1, saved by
`save_adapter(..., use_safetensors=True)`, and the choice scores that model gives.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elm_jax import tree_paths
from elm_jax.checkpoints import adapters_format, expert_files, hf, interchange
from elm_jax.checkpoints.adapter_folders import InterchangeError
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.experts import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from tests.helpers.checkpoints import TIED
from tests.helpers.golden import GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "interchange"
BACKBONE = GOLDEN_DIR / "t5_v1_1"
MAX_RELATIVE = 3e-5  # as tests/models/test_hf_parity.py


@pytest.fixture(scope="module")
def reference():
  return json.loads((GOLDEN / "reference.json").read_text())


@pytest.fixture(scope="module")
def backbone():
  loaded = hf.load_hf_checkpoint(str(BACKBONE))
  return loaded, expert_files.backbone_fingerprint(loaded.params)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, backbone):
  """The golden bottleneck adapter, imported: (tree, metadata)."""
  loaded, fingerprint = backbone
  out = tmp_path_factory.mktemp("imported") / "bn"
  interchange.import_expert(str(GOLDEN / "adapters_bn"), str(out), model_config=loaded.config,
                            fingerprint=fingerprint, backbone_checkpoint=str(BACKBONE))
  return expert_files.load_expert(str(out), fingerprint)


def test_imported_adapter_scores_as_the_adapters_package_does(imported, backbone, reference):
  tree, meta = imported
  loaded, _ = backbone
  config = ExpertConfig(**meta.expert_config)
  assert (config.kind, config.reduction_factor, config.train_layer_norms) == ("adapter", 8, False)
  assert meta.training_config["imported"]["format"] == "adapters"
  scores = EncoderDecoderModel.build(loaded.config, config).choice_log_likelihoods(
      merge_params(loaded.params, tree), np.array(reference["encoder_tokens"], np.int32),
      np.array(reference["choice_targets"], np.int32))
  want = np.array(reference["scores"]["adapters_bn"])
  tolerance = MAX_RELATIVE * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5, atol=tolerance)
  assert np.abs(want - np.array(reference["scores"]["base"])).max() > 1000 * tolerance


def _tensors(folder):
  return load_file(str(folder / "adapter.safetensors"))


def test_golden_round_trip_writes_the_packages_folder_bitwise(imported, backbone, tmp_path):
  tree, meta = imported
  loaded, _ = backbone
  meta = expert_files.ExpertMetadata(**{**meta.__dict__, "name": "elm_bn"})
  out = tmp_path / "exported"
  interchange.export_expert(tree, meta, str(out), "adapters", model_config=loaded.config,
                            base_model="tests/golden/t5_v1_1")
  assert json.loads((out / "adapter_config.json").read_text()) == \
      json.loads((GOLDEN / "adapters_bn" / "adapter_config.json").read_text())
  ours, theirs = _tensors(out), _tensors(GOLDEN / "adapters_bn")
  assert ours.keys() == theirs.keys()
  for name in theirs:
    assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name


def test_elm_adapter_round_trip_through_adapters_is_bitwise(tmp_path):
  config = ExpertConfig(kind="adapter", reduction_factor=4, train_layer_norms=False)
  rng = np.random.default_rng(11)
  shapes = expert_files.parameter_list(config, TIED, "test")
  flat = {name: rng.standard_normal(s.shape).astype(np.float32) for name, s in shapes.items()}
  assert not any("encoder_decoder" in name for name in flat)
  tree = tree_paths.unflatten({tree_paths.split(k): v for k, v in flat.items()})
  meta = expert_files.ExpertMetadata(name="my.expert", task="t", expert_config=dict(config.__dict__),
                                     backbone_fingerprint="f" * 32)
  interchange.export_expert(tree, meta, str(tmp_path / "bn"), "adapters", model_config=TIED, base_model="b",
                            model_type="mt5")
  written = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
  assert (written["name"], written["model_type"], written["hidden_size"]) == ("my_expert", "mt5", TIED.emb_dim)
  stored = _tensors(tmp_path / "bn")
  assert np.array_equal(stored["decoder.block.1.layer.2.adapters.my_expert.adapter_up.weight"],
                        flat["decoder/layers_1/mlp_adapter/up_kernel"].T)
  back = adapters_format.read_adapters(str(tmp_path / "bn"), TIED)
  assert ExpertConfig(**back.expert_config) == config
  assert back.tensors.keys() == flat.keys()
  for name, value in flat.items():
    assert np.array_equal(back.tensors[name], value), name


def test_export_refuses_what_the_format_cannot_hold(imported, backbone, tmp_path):
  tree, meta = imported
  loaded, _ = backbone
  with_norms = expert_files.ExpertMetadata(**{**meta.__dict__, "expert_config": {
      **meta.expert_config, "train_layer_norms": True}})
  with pytest.raises(InterchangeError, match=r"trains the layer-norm scales \(train_layer_norms\), which an "
                                             r"`adapters` folder cannot hold"):
    interchange.export_expert(tree, with_norms, str(tmp_path / "a"), "adapters", model_config=loaded.config,
                              base_model="")
  lora = expert_files.ExpertMetadata(name="l", task="t", expert_config={"kind": "lora"}, backbone_fingerprint="f")
  with pytest.raises(InterchangeError, match="'lora' expert cannot be an `adapters` bottleneck adapter"):
    interchange.export_expert({}, lora, str(tmp_path / "b"), "adapters", model_config=loaded.config,
                              base_model="")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------- refusals
def _folder(tmp_path, changes=None, top=None, tensors=None):
  """A copy of the golden folder with `changes` to its `config` object and `top` to the file's
  top level (None deletes a field), and `tensors(dict) -> dict` applied to its tensors."""
  folder = tmp_path / "bn"
  shutil.copytree(GOLDEN / "adapters_bn", folder)
  path = folder / "adapter_config.json"
  raw = json.loads(path.read_text())
  for target, edits in ((raw["config"], changes), (raw, top)):
    for field, value in (edits or {}).items():
      if value is None:
        target.pop(field, None)
      else:
        target[field] = value
  path.write_text(json.dumps(raw))
  if tensors is not None:
    save_file(tensors(_tensors(folder)), str(folder / "adapter.safetensors"))
  return folder


@pytest.mark.parametrize("changes,top,field,words", [
    ({"original_ln_before": True}, None, "config.original_ln_before", "Pfeiffer's placement"),
    ({"original_ln_after": False}, None, "config.original_ln_after", "residual connection is dropped"),
    ({"cross_adapter": True}, None, "config.cross_adapter", "no adapter after cross-attention"),
    ({"mh_adapter": False}, None, "config.mh_adapter", "every self-attention"),
    ({"output_adapter": False}, None, "config.output_adapter", "every feed-forward"),
    ({"ln_before": True}, None, "config.ln_before", "no layer norm of its own"),
    ({"ln_after": True}, None, "config.ln_after", "no layer norm of its own"),
    ({"is_parallel": True}, None, "config.is_parallel", "parallel adapter"),
    ({"use_gating": True}, None, "config.use_gating", "no gate"),
    ({"phm_layer": True}, None, "config.phm_layer", "PHM"),
    ({"inv_adapter": "nice"}, None, "config.inv_adapter", "invertible"),
    ({"leave_out": [0]}, None, "config.leave_out", "every layer"),
    ({"scaling": 0.5}, None, "config.scaling", "unscaled"),
    ({"scaling": "learned"}, None, "config.scaling", "unscaled"),
    ({"reduction_factor": {"default": 8}}, None, "config.reduction_factor", "the same in every layer"),
    ({"reduction_factor": 2.5}, None, "config.reduction_factor", "an integer"),
    ({"non_linearity": "relu"}, None, "config.non_linearity", "tanh approximation of GELU"),
    ({"architecture": "lora"}, None, "config.architecture", "LoRA and IA3 come through PEFT"),
    ({"a_future_option": 3}, None, "config.a_future_option", "not an option of a bottleneck adapter"),
    (None, {"model_type": "bart"}, "model_type", "'t5' or 'mt5'"),
    (None, {"hidden_size": 64}, "hidden_size", "32 (this backbone's d_model)"),
    (None, {"name": None}, "name", "its tensors are named after it"),
])
def test_configurations_elm_jax_cannot_compute_are_refused(tmp_path, backbone, changes, top, field, words):
  folder = _folder(tmp_path, changes, top)
  with pytest.raises(InterchangeError) as e:
    adapters_format.read_adapters(str(folder), backbone[0].config)
  message = str(e.value)
  assert message.startswith(f"{folder}/adapter_config.json: field {field!r}"), message
  assert words in message, message


def test_old_and_flex_head_folders_are_read(tmp_path, backbone):
  """adapter-transformers (no `version`) named tanh GELU 'gelu'; a T5AdapterModel saves its
  tensors under `transformer.`."""
  loaded, _ = backbone
  want = adapters_format.read_adapters(str(GOLDEN / "adapters_bn"), loaded.config)
  folder = _folder(tmp_path, {"non_linearity": "gelu"}, {"version": None},
                   tensors=lambda t: {"transformer." + k: v for k, v in t.items()})
  got = adapters_format.read_adapters(str(folder), loaded.config)
  assert got.expert_config == want.expert_config
  assert all(np.array_equal(got.tensors[k], v) for k, v in want.tensors.items())
  # With a `version`, 'gelu' is the erf GELU: refused.
  with pytest.raises(InterchangeError, match="config.non_linearity"):
    adapters_format.read_adapters(str(_folder(tmp_path / "new", {"non_linearity": "gelu"})), loaded.config)


def test_tensors_that_do_not_match_and_pickles_are_refused(tmp_path, backbone):
  loaded, _ = backbone
  name = "decoder.block.1.layer.2.adapters.elm_bn.adapter_down.0.bias"
  folder = _folder(tmp_path, tensors=lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(InterchangeError, match=f"adapter.safetensors: missing tensor '{name}'"):
    adapters_format.read_adapters(str(folder), loaded.config)
  cross = "decoder.block.0.layer.1.adapters.elm_bn.adapter_up.bias"
  folder = _folder(tmp_path / "cross", tensors=lambda t: {**t, cross: np.zeros(32, np.float32)})
  with pytest.raises(InterchangeError, match=f"unexpected tensor '{cross}'"):
    adapters_format.read_adapters(str(folder), loaded.config)
  folder = _folder(tmp_path / "pickle")
  (folder / "adapter.safetensors").rename(folder / "pytorch_adapter.bin")
  with pytest.raises(InterchangeError, match=r"pytorch_adapter\.bin but no adapter\.safetensors.*"
                                             r"use_safetensors=True"):
    adapters_format.read_adapters(str(folder), loaded.config)


def test_library_add_of_an_adapters_folder(tmp_path):
  library = ExpertLibrary(str(tmp_path / "lib"), create=True)
  name = library.add(str(GOLDEN / "adapters_bn"), checkpoint=str(BACKBONE))
  assert name == "adapters_bn" and library.entry(name)["kind"] == "adapter"
  assert library.entry(name)["provenance"] == {"source": str(GOLDEN / "adapters_bn"), "imported_from": "adapters"}
  tree, meta = library.load(name)
  assert meta.training_config["imported"]["config"]["name"] == "elm_bn"
  assert library.add(str(GOLDEN / "adapters_bn")) == name  # the same files again: nothing to do
  assert len(library.history()) == 1
