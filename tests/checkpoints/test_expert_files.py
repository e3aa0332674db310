"""Expert directories: round trip, backbone fingerprint check, refusals."""

import dataclasses
import json

import numpy as np
import pytest

from elm_jax.checkpoints import expert_files as ef
from elm_jax.models.adapters import ExpertConfig


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"layers_0": {"mlp_adapter": {"up_kernel": rng.standard_normal((2, 8)).astype(np.float32)}},
                      "encoder_norm": {"scale": np.ones(8, np.float32)}}}


def _metadata(fingerprint):
  return ef.ExpertMetadata(name="cosmos_qa@no_prompt_text", task="elm_pe_cosmos_qa_no_prompt_text",
                           prompt="no_prompt_text", expert_config=dataclasses.asdict(ExpertConfig()),
                           backbone_fingerprint=fingerprint, steps=10, metrics={"loss": 1.5})


def test_round_trip_and_fingerprint(tmp_path):
  backbone = {"token_embedder": {"embedding": np.arange(12, dtype=np.float32).reshape(3, 4)}}
  fp = ef.backbone_fingerprint(backbone)
  assert fp == ef.backbone_fingerprint({"token_embedder": {"embedding": np.arange(12, dtype=np.float32).reshape(3, 4)}})
  other = ef.backbone_fingerprint({"token_embedder": {"embedding": np.arange(12, dtype=np.float32).reshape(4, 3)}})
  assert other != fp
  ef.save_expert(str(tmp_path / "e"), _params(), _metadata(fp))
  params, meta = ef.load_expert(str(tmp_path / "e"), backbone_fingerprint=fp)
  np.testing.assert_array_equal(params["encoder"]["layers_0"]["mlp_adapter"]["up_kernel"],
                                _params()["encoder"]["layers_0"]["mlp_adapter"]["up_kernel"])
  assert meta.metrics == {"loss": 1.5} and meta.steps == 10
  with pytest.raises(ef.ExpertFileError, match="was trained on backbone .* pass force=True"):
    ef.load_expert(str(tmp_path / "e"), backbone_fingerprint=other)
  ef.load_expert(str(tmp_path / "e"), backbone_fingerprint=other, force=True)


def test_refusals(tmp_path):
  ef.save_expert(str(tmp_path / "e"), _params(), _metadata("abc"))
  with pytest.raises(ef.ExpertFileError, match="already exists"):
    ef.save_expert(str(tmp_path / "e"), _params(1), _metadata("abc"))
  meta = json.loads((tmp_path / "e" / "expert.json").read_text())
  del meta["task"]
  (tmp_path / "e" / "expert.json").write_text(json.dumps(meta))
  with pytest.raises(ef.ExpertFileError, match="expert.json: field 'task' must be a str"):
    ef.load_expert(str(tmp_path / "e"))
  with pytest.raises(ef.ExpertFileError, match="missing/expert.json: not found"):
    ef.load_expert(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- parameter list
def test_parameter_list_of_each_kind(tiny_config):
  """Each kind's list, derived from the model: full fine-tuning holds the backbone's every
  tensor (as `t5.param_shapes` derives it without an expert); an adapter holds two bottleneck
  adapters per encoder block, two per decoder block (none on cross-attention) and, with
  train_layer_norms, every layer-norm scale; LoRA holds a [in, rank] and [rank, out] factor
  per target kernel of every attention."""
  from elm_jax import tree_paths
  from elm_jax.models.t5 import param_shapes
  emb, layers = tiny_config.emb_dim, tiny_config.num_encoder_layers
  full = ef.parameter_list(ExpertConfig(kind="full"), tiny_config, "test")
  assert {k: tuple(v.shape) for k, v in full.items()} == {
      tree_paths.join(p): s for p, s in tree_paths.flatten(param_shapes(tiny_config)).items()}
  assert {str(v.dtype) for v in full.values()} == {"float32"}

  adapter = ef.parameter_list(ExpertConfig(kind="adapter", reduction_factor=8), tiny_config, "test")
  norms = {k for k in adapter if k.endswith("/scale")}
  assert len(norms) == 2 * layers + 3 * layers + 2  # encoder 2 per block, decoder 3, two final norms
  modules = {k.rsplit("/", 1)[0] for k in adapter if k not in norms}
  assert modules == {f"{stack}/layers_{i}/{m}_adapter" for i in range(layers)
                     for stack, m in [("encoder", "attention"), ("encoder", "mlp"),
                                      ("decoder", "self_attention"), ("decoder", "mlp")]}
  assert tuple(adapter["encoder/layers_1/mlp_adapter/down_kernel"].shape) == (emb, emb // 8)
  assert tuple(adapter["decoder/layers_0/self_attention_adapter/up_bias"].shape) == (emb,)
  without_norms = ef.parameter_list(ExpertConfig(kind="adapter", train_layer_norms=False),
                                    tiny_config, "test")
  assert set(without_norms) == {k for k in adapter if k not in norms}

  lora = ef.parameter_list(ExpertConfig(kind="lora", lora_rank=3, lora_targets=("query", "wo")),
                           tiny_config, "test")
  factors = {k: tuple(v.shape) for k, v in lora.items() if not k.endswith("/scale")}
  inner = tiny_config.num_heads * tiny_config.head_dim
  for i in range(layers):
    assert factors[f"encoder/layers_{i}/attention/query/lora_a"] == (emb, 3)
    assert factors[f"decoder/layers_{i}/encoder_decoder_attention/query/lora_b"] == (3, inner)
    assert factors[f"decoder/layers_{i}/mlp/wo/lora_a"] == (tiny_config.mlp_dim, 3)
  # (a, b) x (query in 3 attentions per encoder + decoder block pair, wo in 2 feed-forwards)
  assert len(factors) == 2 * (3 * layers + 2 * layers)
  assert not any("/value/" in k or "kernel" in k for k in factors)


def _trained_like(tiny_config, kind="adapter", seed=0):
  """An expert of `kind` holding exactly its parameter list (random values) and its metadata
  recording the backbone config, as training writes them."""
  from elm_jax import tree_paths
  config = ExpertConfig(kind=kind)
  rng = np.random.default_rng(seed)
  tensors = {k: rng.standard_normal(v.shape).astype(np.float32)
             for k, v in ef.parameter_list(config, tiny_config, "test").items()}
  meta = dataclasses.replace(_metadata("abc"), expert_config=dataclasses.asdict(config),
                             training_config={"model": dataclasses.asdict(tiny_config)})
  return tree_paths.unflatten({tree_paths.split(k): v for k, v in tensors.items()}), tensors, meta


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_load_refuses_what_the_kind_does_not_hold(tiny_config, tmp_path, kind):
  from safetensors.numpy import save_file
  tree, tensors, meta = _trained_like(tiny_config, kind)
  ef.save_expert(str(tmp_path / "e"), tree, meta)
  params, _ = ef.load_expert(str(tmp_path / "e"))  # exactly its list: accepted
  path = tmp_path / "e" / "tensors.safetensors"
  first = sorted(tensors)[0]
  cases = [
      ({**tensors, "decoder/layers_0/mlp/wi_0/kernel": np.zeros((32, 64), np.float32)},
       rf"tensors.safetensors: tensor 'decoder/layers_0/mlp/wi_0/kernel' is not a parameter of an? '{kind}' expert"),
      ({k: v for k, v in tensors.items() if k != first}, rf"tensor '{first}' is missing \(expected"),
      ({**tensors, first: tensors[first].T.copy()} if tensors[first].ndim == 2 else
       {**tensors, first: tensors[first][:-1].copy()}, rf"tensor '{first}' has shape"),
      ({**tensors, first: tensors[first].astype(np.float64)}, rf"tensor '{first}' has dtype float64, expected float32"),
      ({**tensors, first: np.full_like(tensors[first], np.nan)},
       rf"tensor '{first}' holds {tensors[first].size} NaN values"),
  ]
  for bad, message in cases:
    save_file(bad, str(path))
    with pytest.raises(ef.ExpertFileError, match=message):
      ef.load_expert(str(tmp_path / "e"))


def test_without_a_recorded_backbone_config_names_are_checked_by_kind(tmp_path):
  """An expert.json without training_config.model: the names are checked against what its kind
  trains (the shapes are checked once the backbone is known, when loaded onto it)."""
  params = _params()
  params["decoder"] = {"layers_0": {"mlp": {"wo": {"kernel": np.zeros((4, 8), np.float32)}}}}
  ef.save_expert(str(tmp_path / "e"), params, _metadata("abc"))
  with pytest.raises(ef.ExpertFileError, match=r"tensor 'decoder/layers_0/mlp/wo/kernel' is not a parameter "
                                                r"of an 'adapter' expert \(expected only the modules its kind adds"):
    ef.load_expert(str(tmp_path / "e"))
  full = dataclasses.replace(_metadata("abc"), expert_config=dataclasses.asdict(ExpertConfig(kind="full")))
  ef.save_expert(str(tmp_path / "f"), params, full)
  ef.load_expert(str(tmp_path / "f"))  # every tensor is a parameter of a full fine-tune


def test_nonfinite_counts_are_named():
  a = np.zeros((4, 4), np.float32)
  a.flat[[1, 2, 3]] = np.nan
  a.flat[7] = np.inf
  a.flat[8] = -np.inf
  assert ef.nonfinite_problems({"x/y": a, "ok": np.ones(3, np.float32)}) == [
      "tensor 'x/y' holds 3 NaN and 2 Inf values"]
  assert ef.nonfinite_problems({"b": np.array([np.inf], np.float32)}) == ["tensor 'b' holds 1 Inf value"]
  assert ef.nonfinite_problems({"i": np.arange(3)}) == []


def test_check_expert_reads_a_checked_expert_once(tiny_config, tmp_path, monkeypatch):
  """`library add` checks every expert before it creates the library and again as it adds it:
  the second check of unchanged files does not read them; a changed file is read again."""
  tree, _, meta = _trained_like(tiny_config)
  ef.save_expert(str(tmp_path / "e"), tree, meta)
  calls = []
  load = ef.load_expert
  monkeypatch.setattr(ef, "load_expert", lambda *a, **k: calls.append(a) or load(*a, **k))
  assert ef.check_expert(str(tmp_path / "e")).name == meta.name
  assert ef.check_expert(str(tmp_path / "e")).name == meta.name
  assert len(calls) == 1
  tree2, _, _ = _trained_like(tiny_config, seed=1)
  ef.save_expert(str(tmp_path / "e"), tree2, meta, overwrite=True)
  ef.check_expert(str(tmp_path / "e"))
  assert len(calls) == 2
