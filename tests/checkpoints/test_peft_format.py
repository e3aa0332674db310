"""LoRA and IA3 experts to and from PEFT folders (elm_jax/checkpoints/peft_format.py).

The goldens in tests/golden/interchange/ were made by tools/make_interchange_goldens.py with
PEFT itself (versions in reference.json) on the tiny T5 v1.1 of tests/golden/t5_v1_1: a LoRA
on every projection with the layer norms as modules_to_save, saved by `save_pretrained`, and
the choice scores PEFT's model gives; the same for an IA3 on k, v and wo. No torch is needed here.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elm_jax.checkpoints import expert_files, hf, interchange, peft_format
from elm_jax.checkpoints.adapter_folders import InterchangeError
from elm_jax.commands import cli
from elm_jax.library.store import ExpertLibrary, LibraryError
from elm_jax.models.experts import ExpertConfig, merge_params
from elm_jax.models.model import EncoderDecoderModel
from tests.helpers.checkpoints import TIED
from tests.helpers.golden import GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "interchange"
BACKBONE = GOLDEN_DIR / "t5_v1_1"
# As tests/models/test_hf_parity.py: float32 sums in another order differ by ~1e-6 of the
# largest score; a wrong scale, a transposed factor or a missing module moves them by O(1).
MAX_RELATIVE = 3e-5


@pytest.fixture(scope="module")
def reference():
  return json.loads((GOLDEN / "reference.json").read_text())


@pytest.fixture(scope="module")
def backbone():
  loaded = hf.load_hf_checkpoint(str(BACKBONE))
  return loaded, expert_files.backbone_fingerprint(loaded.params)


def _import(folder, out, backbone):
  loaded, fingerprint = backbone
  meta = interchange.import_expert(str(folder), str(out), model_config=loaded.config, fingerprint=fingerprint,
                                   backbone_checkpoint=str(BACKBONE))
  return expert_files.load_expert(str(out), fingerprint)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, backbone):
  """The golden PEFT LoRA and IA3, imported: {folder name: (tree, metadata)}."""
  root = tmp_path_factory.mktemp("imported")
  return {name: _import(GOLDEN / name, root / name, backbone) for name in ("peft_lora", "peft_ia3")}


@pytest.mark.parametrize("folder,settings", [
    ("peft_lora", {"kind": "lora", "lora_rank": 4, "lora_alpha": 8.0, "train_layer_norms": True,
                   "lora_targets": ["query", "key", "value", "out", "wi_0", "wi_1", "wo"]}),
    ("peft_ia3", {"kind": "ia3", "train_layer_norms": False})])
def test_imported_experts_score_as_peft_does(imported, backbone, reference, folder, settings):
  tree, meta = imported[folder]
  loaded, _ = backbone
  assert {k: meta.expert_config[k] for k in settings} == settings
  scores = EncoderDecoderModel.build(loaded.config, ExpertConfig(**meta.expert_config)).choice_log_likelihoods(
      merge_params(loaded.params, tree), np.array(reference["encoder_tokens"], np.int32),
      np.array(reference["choice_targets"], np.int32))
  want = np.array(reference["scores"][folder])
  tolerance = MAX_RELATIVE * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5, atol=tolerance)
  # The expert matters: without it (or without its layer norms) the scores are far off.
  assert np.abs(want - np.array(reference["scores"]["base"])).max() > 1000 * tolerance


def test_imported_expert_records_where_it_came_from(imported, backbone):
  _, meta = imported["peft_lora"]
  loaded, fingerprint = backbone
  record = meta.training_config["imported"]
  assert record["format"] == "peft" and record["source"] == str(GOLDEN / "peft_lora")
  assert record["config"] == json.loads((GOLDEN / "peft_lora" / "adapter_config.json").read_text())
  assert meta.backbone_fingerprint == fingerprint and meta.name == "peft_lora" and meta.task == "peft:peft_lora"
  assert expert_files.recorded_model_config(meta, "x") == loaded.config


def _tensors(folder):
  return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("folder,peft_type", [("peft_lora", "LORA"), ("peft_ia3", "IA3")])
def test_golden_round_trip_is_bitwise_and_peft_reads_our_config_as_its_own(imported, backbone, reference,
                                                                          tmp_path, folder, peft_type):
  tree, meta = imported[folder]
  loaded, _ = backbone
  out = tmp_path / "exported"
  written = interchange.export_expert(tree, meta, str(out), "peft", model_config=loaded.config,
                                      base_model="tests/golden/t5_v1_1")
  assert sorted(written) == ["adapter_config.json", "adapter_model.safetensors"]
  ours, theirs = _tensors(out), _tensors(GOLDEN / folder)
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
  # Every field PEFT wrote: ours holds the same value, or leaves it out and PEFT's default is it.
  config = json.loads((out / "adapter_config.json").read_text())
  golden = json.loads((GOLDEN / folder / "adapter_config.json").read_text())
  defaults = reference["peft_defaults"][peft_type]
  assert set(config) <= set(golden)
  for field, value in golden.items():
    if field in ("target_modules", "feedforward_modules", "modules_to_save") and value:
      assert sorted(config[field]) == sorted(value), field  # PEFT writes sets in set order
    elif field != "peft_version":
      assert config.get(field, defaults.get(field)) == value, field
  back, back_meta = _import(out, tmp_path / "back", backbone)
  assert back_meta.expert_config == meta.expert_config
  flat, back_flat = expert_files.tree_paths.flatten(tree), expert_files.tree_paths.flatten(back)
  assert flat.keys() == back_flat.keys()
  for path in flat:
    assert np.array_equal(flat[path], back_flat[path]), path


@pytest.mark.parametrize("config", [
    ExpertConfig(kind="lora", lora_rank=3, lora_alpha=5.5, lora_targets=("query", "key", "value", "out", "wi", "wo"),
                 train_layer_norms=True),
    ExpertConfig(kind="lora", lora_rank=3, lora_alpha=5.5, lora_targets=("value", "query"), train_layer_norms=False),
    ExpertConfig(kind="ia3", train_layer_norms=False),
    ExpertConfig(kind="ia3", train_layer_norms=True)], ids=["lora_norms", "lora", "ia3", "ia3_norms"])
def test_elm_expert_round_trip_through_peft_is_bitwise(tmp_path, config):
  """An expert of ours (the original T5's relu `wi`; LoRA targets in any order) -> PEFT -> ours."""
  rng = np.random.default_rng(7)
  shapes = expert_files.parameter_list(config, TIED, "test")
  flat = {name: rng.standard_normal(s.shape).astype(np.float32) for name, s in shapes.items()}
  tree = expert_files.tree_paths.unflatten({tuple(k.split("/")): v for k, v in flat.items()})
  meta = expert_files.ExpertMetadata(name="mine", task="t", expert_config=dict(config.__dict__),
                                     backbone_fingerprint="f" * 32)
  interchange.export_expert(tree, meta, str(tmp_path / "peft"), "peft", model_config=TIED, base_model="b")
  stored = _tensors(tmp_path / "peft")
  assert len(stored) == len(flat)
  if any(name.endswith("/lora_a") for name in flat):
    assert np.array_equal(stored["base_model.model.encoder.block.1.layer.0.SelfAttention.v.lora_A.weight"],
                          flat["encoder/layers_1/attention/value/lora_a"].T)
    config = dataclasses.replace(config, lora_targets=tuple(t for t in peft_format.PROJECTIONS
                                                            if t in config.lora_targets))
  else:
    assert np.array_equal(stored["base_model.model.decoder.block.0.layer.1.EncDecAttention.k.ia3_l"],
                          flat["decoder/layers_0/encoder_decoder_attention/key/ia3_scale"][:, None])
    assert np.array_equal(stored["base_model.model.decoder.block.1.layer.2.DenseReluDense.wo.ia3_l"],
                          flat["decoder/layers_1/mlp/wo/ia3_scale"][None, :])
  back = peft_format.read_peft(str(tmp_path / "peft"), TIED)
  assert ExpertConfig(**back.expert_config) == config
  assert back.tensors.keys() == flat.keys()
  for name, value in flat.items():
    assert back.tensors[name].dtype == np.float32 and np.array_equal(back.tensors[name], value), name


# --------------------------------------------------------------------------------- refusals
def _folder(tmp_path, changes=None, tensors=None, golden="peft_lora"):
  """A copy of a golden PEFT folder with `changes` to its config (None deletes a field) and
  `tensors(dict) -> dict` applied to its tensors."""
  folder = tmp_path / golden
  shutil.copytree(GOLDEN / golden, folder)
  path = folder / "adapter_config.json"
  config = json.loads(path.read_text())
  for field, value in (changes or {}).items():
    if value is None:
      config.pop(field, None)
    else:
      config[field] = value
  path.write_text(json.dumps(config))
  if tensors is not None:
    save_file(tensors(_tensors(folder)), str(folder / "adapter_model.safetensors"))
  return folder


@pytest.mark.parametrize("changes,field,words", [
    ({"use_rslora": True}, "use_rslora", "lora_alpha / sqrt(r)"),
    ({"use_dora": True}, "use_dora", "DoRA"),
    ({"bias": "all"}, "bias", "no biases"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out", "[out, in]"),
    ({"rank_pattern": {"q": 8}}, "rank_pattern", "one rank"),
    ({"alpha_pattern": {"q": 2}}, "alpha_pattern", "one lora_alpha"),
    ({"layers_to_transform": [0]}, "layers_to_transform", "every layer"),
    ({"exclude_modules": ["o"]}, "exclude_modules", "every layer"),
    ({"target_modules": ["q", "lm_head"]}, "target_modules", "'lm_head'"),
    ({"target_modules": r"encoder.*\.q"}, "target_modules", "not 'decoder.block.0.layer.0.SelfAttention.q'"),
    ({"target_modules": ["SelfAttention.q", "v"]}, "target_modules",
     "but not 'decoder.block.0.layer.1.EncDecAttention.q'"),
    ({"target_modules": None}, "target_modules", "a list of LoRA modules"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "layer_norm"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", "rewrite the base model's weights"),
    ({"task_type": "SEQ_CLS"}, "task_type", "sequence-to-sequence"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type", "'LORA' or 'IA3'"),
    ({"r": 0}, "r", "positive integer"),
    ({"a_future_option": {"x": 1}}, "a_future_option", "not an option of LoRA"),
])
def test_configurations_elm_jax_cannot_compute_are_refused(tmp_path, backbone, changes, field, words):
  folder = _folder(tmp_path, changes)
  with pytest.raises(InterchangeError) as e:
    peft_format.read_peft(str(folder), backbone[0].config)
  message = str(e.value)
  assert message.startswith(f"{folder}/adapter_config.json: field {field!r}"), message
  assert words in message, message


@pytest.mark.parametrize("changes,field,words", [
    ({"target_modules": ["k", "v"]}, "target_modules", "the input of every wo"),
    ({"target_modules": ["k", "v", "wo", "q"]}, "target_modules", "which elm_jax's IA3 does not adapt"),
    ({"feedforward_modules": []}, "feedforward_modules", "a list of IA3 modules"),
    ({"feedforward_modules": ["k", "wo"]}, "feedforward_modules", "['wo']"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out", "[out, in]"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "layer_norm"),
    ({"exclude_modules": ["EncDecAttention.k"]}, "exclude_modules", "every attention"),
])
def test_ia3_configurations_elm_jax_cannot_compute_are_refused(tmp_path, backbone, changes, field, words):
  folder = _folder(tmp_path, changes, golden="peft_ia3")
  with pytest.raises(InterchangeError) as e:
    peft_format.read_peft(str(folder), backbone[0].config)
  message = str(e.value)
  assert message.startswith(f"{folder}/adapter_config.json: field {field!r}"), message
  assert words in message, message


def test_targets_as_a_regex_or_with_names_t5_lacks_select_the_same_lora(tmp_path, backbone):
  loaded, _ = backbone
  plain = peft_format.read_peft(str(GOLDEN / "peft_lora"), loaded.config)
  for i, targets in enumerate([r".*\.(q|k|v|o|wi_0|wi_1|wo)", ["q", "k", "v", "o", "wi_0", "wi_1", "wo", "q_proj"]]):
    other = peft_format.read_peft(str(_folder(tmp_path / str(i), {"target_modules": targets})), loaded.config)
    assert other.expert_config == plain.expert_config


def test_tensors_that_do_not_match_the_config_are_refused(tmp_path, backbone):
  loaded, _ = backbone
  name = "base_model.model.decoder.block.1.layer.1.EncDecAttention.o.lora_B.weight"
  cases = [(lambda t: {k: v for k, v in t.items() if k != name}, f"missing tensor {name!r}"),
           (lambda t: {**t, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)},
            "unexpected tensor 'base_model.model.lm_head.lora_A.weight'"),
           (lambda t: {**t, name: np.zeros((32, 5), np.float32)},
            f"tensor {name!r} has shape (32, 5); expected (32, 4)")]
  for i, (edit, words) in enumerate(cases):
    folder = _folder(tmp_path / str(i), tensors=edit)
    with pytest.raises(InterchangeError, match="adapter_model.safetensors: ") as e:
      peft_format.read_peft(str(folder), loaded.config)
    assert words in str(e.value)


def test_half_precision_tensors_are_widened_exactly(tmp_path, backbone):
  import ml_dtypes
  loaded, _ = backbone
  folder = _folder(tmp_path, tensors=lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  got = peft_format.read_peft(str(folder), loaded.config)
  want = peft_format.read_peft(str(GOLDEN / "peft_lora"), loaded.config)
  for name, value in want.tensors.items():
    assert got.tensors[name].dtype == np.float32
    assert np.array_equal(got.tensors[name], value.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_a_pickle_file_is_refused_with_the_conversion(tmp_path, backbone):
  folder = _folder(tmp_path)
  (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
  with pytest.raises(InterchangeError, match=r"adapter_model\.bin but no adapter_model\.safetensors.*"
                                             r"unpickling runs arbitrary code.*safe_serialization=True"):
    peft_format.read_peft(str(folder), backbone[0].config)


def test_export_refuses_kinds_peft_cannot_hold_and_an_existing_folder(imported, backbone, tmp_path):
  tree, meta = imported["peft_lora"]
  loaded, _ = backbone
  adapter_meta = expert_files.ExpertMetadata(name="a", task="t", expert_config={"kind": "adapter"},
                                             backbone_fingerprint="f" * 32)
  with pytest.raises(InterchangeError, match="'adapter' expert cannot be a PEFT adapter.*--format=adapters"):
    interchange.export_expert({}, adapter_meta, str(tmp_path / "a"), "peft", model_config=loaded.config,
                              base_model="")
  (tmp_path / "there").mkdir()
  with pytest.raises(Exception, match="already exists"):
    interchange.export_expert(tree, meta, str(tmp_path / "there"), "peft", model_config=loaded.config,
                              base_model="")


# --------------------------------------------------------------------------------- library
def _run(capsys, *argv):
  capsys.readouterr()
  code = cli.main(list(argv))
  out = capsys.readouterr()
  assert code == 0, out.err
  return out.out


def test_library_add_and_export_of_a_peft_folder(tmp_path, capsys):
  lib = str(tmp_path / "lib")
  folder = str(GOLDEN / "peft_lora")
  out = _run(capsys, "library", "add", f"--library={lib}", f"--checkpoint={BACKBONE}", "--keys=none", folder)
  assert "added peft_lora (imported lora expert from the peft folder" in out
  out = _run(capsys, "library", "add", f"--library={lib}", f"--checkpoint={BACKBONE}", "--keys=none", folder)
  assert "already in the library: peft_lora" in out
  library = ExpertLibrary(lib)
  entry = library.entry("peft_lora")
  assert entry["kind"] == "lora" and entry["provenance"] == {"source": folder, "imported_from": "peft"}
  assert library.manifest()["backbone_checkpoint"] == str(BACKBONE)
  # Checked against the library's backbone like any other: another backbone is refused.
  other = tmp_path / "other_backbone"  # the same shapes, one weight changed
  shutil.copytree(BACKBONE, other)
  weights = load_file(str(other / "model.safetensors"))
  weights["shared.weight"][0, 0] += 1.0
  save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(LibraryError, match="this library's experts use"):
    library.add(str(GOLDEN / "peft_lora"), name="on_other", checkpoint=str(other))
  exported = tmp_path / "out"
  out = _run(capsys, "library", "export", "peft_lora", str(exported), "--format=peft", f"--library={lib}",
             "--base_model=google/flan-t5-small")
  assert "wrote" in out
  assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == \
      "google/flan-t5-small"
  theirs = _tensors(GOLDEN / "peft_lora")
  ours = _tensors(exported)
  assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  capsys.readouterr()
  assert cli.main(["library", "export", "peft_lora", str(exported), "--format=adapters", f"--library={lib}"]) == 2
  assert "'lora' expert cannot be an `adapters` bottleneck adapter" in capsys.readouterr().err


def test_import_without_a_backbone_is_refused(tmp_path):
  library = ExpertLibrary(str(tmp_path / "lib"), create=True)
  with pytest.raises(InterchangeError, match="needs the backbone it runs on; pass --checkpoint=DIR"):
    library.add(str(GOLDEN / "peft_lora"))
