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
