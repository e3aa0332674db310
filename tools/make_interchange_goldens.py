"""Builds the golden files that the PEFT and AdapterHub interchange tests compare against.

On the tiny T5 v1.1 of `tests/golden/t5_v1_1` (gated-GELU, untied; made by
tools/make_t5_goldens.py), this script trains nothing: it adds an expert with the reference
library, sets its weights to fixed random values large enough to move the scores, saves it with
that library's own `save_*` call, loads the saved folder again on a fresh copy of the model (so
the folder alone reproduces the expert), and scores a few choices with it. It writes, under
``tests/golden/interchange/``:

* ``peft_lora/``: ``adapter_config.json`` + ``adapter_model.safetensors`` from PEFT's
  ``save_pretrained``: LoRA r=4, lora_alpha=8 on q, k, v, o, wi_0, wi_1, wo (every attention,
  cross-attention included) and the layer-norm scales as ``modules_to_save``
  (``layer_norm``, ``final_layer_norm``);
* ``peft_ia3/``: the same for PEFT's IA3 (k, v, wo; ``feedforward_modules`` wo), without
  ``modules_to_save``;
* ``adapters_bn/``: ``adapter_config.json`` + ``adapter.safetensors`` from the ``adapters``
  package's ``save_adapter(..., with_head=False, use_safetensors=True)``: a Houlsby
  (``DoubleSeqBnConfig``) bottleneck adapter, reduction factor 8, ``gelu_new``;
* ``reference.json``: the versions used, the inputs (token ids: ``encoder_tokens`` [N, Li] and
  ``choice_targets`` [N, C, Lt], EOS included, 0 = padding), and for ``base`` (no expert) and
  each expert the choice scores [N, C]: the SUM of the teacher-forced float32 log_softmax
  log-probabilities of a choice's tokens (summed in float64), as elm_jax's rank scoring defines
  them. ``peft_defaults`` holds ``LoraConfig().to_dict()`` and ``IA3Config().to_dict()`` (the
  values PEFT gives the fields a config file leaves out), so a test can tell that PEFT reads
  elm_jax's shorter ``adapter_config.json`` as the same configuration.

The elm_jax tests read these files and need no torch. Run from the repository root with a
throwaway environment (the ``interchange`` extra of pyproject.toml):

    python3 -m venv /tmp/peftvenv
    /tmp/peftvenv/bin/pip install torch==2.13.0 transformers==4.57.6 peft==0.21.2 adapters==1.3.0
    /tmp/peftvenv/bin/python tools/make_interchange_goldens.py

Everything is float32 and seeded, and the script runs itself with PYTHONHASHSEED=0 (PEFT writes
``target_modules`` in set order): re-running writes the same files.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile

import numpy as np
import torch

import adapters
import peft
import transformers
from adapters import DoubleSeqBnConfig
from peft import IA3Config, LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import T5ForConditionalGeneration

REPO = pathlib.Path(__file__).resolve().parent.parent
BACKBONE = "tests/golden/t5_v1_1"  # relative: recorded as base_model_name_or_path
OUT = REPO / "tests" / "golden" / "interchange"
PAD, EOS, START = 0, 1, 0
SEED = 3030

LORA = dict(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
            modules_to_save=["layer_norm", "final_layer_norm"])
IA3 = dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
ADAPTER_NAME = "elm_bn"
BOTTLENECK = dict(reduction_factor=8, non_linearity="gelu_new")


def backbone() -> T5ForConditionalGeneration:
  model = T5ForConditionalGeneration.from_pretrained(BACKBONE, torch_dtype=torch.float32)
  return model.eval()


def choice_inputs(vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """encoder_tokens [4, Li] and choice_targets [4, 3, Lt]: random ids >= 3, then EOS, then 0."""
  rng = np.random.default_rng(SEED)
  inputs = [list(rng.integers(3, vocab, size=n)) + [EOS] for n in (7, 12, 4, 9)]
  choices = [[list(rng.integers(3, vocab, size=n)) + [EOS] for n in rng.integers(1, 6, size=3)]
             for _ in inputs]
  li = max(map(len, inputs))
  lt = max(len(c) for row in choices for c in row)
  encoder_tokens = np.zeros((len(inputs), li), np.int64)
  choice_targets = np.zeros((len(inputs), 3, lt), np.int64)
  for i, row in enumerate(inputs):
    encoder_tokens[i, :len(row)] = row
    for c, target in enumerate(choices[i]):
      choice_targets[i, c, :len(target)] = target
  return encoder_tokens, choice_targets


@torch.no_grad()
def choice_scores(model, encoder_tokens: np.ndarray, choice_targets: np.ndarray) -> list[list[float]]:
  """[N, C]: per choice, the sum over its tokens of log_softmax(logits) (float32, summed in float64)."""
  n, c, lt = choice_targets.shape
  inputs = torch.tensor(np.repeat(encoder_tokens, c, axis=0))
  targets = torch.tensor(choice_targets.reshape(n * c, lt))
  decoder_inputs = torch.cat([torch.full((n * c, 1), START), targets[:, :-1]], dim=1)
  # The decoder is causal: padding after a choice cannot reach its tokens, and is not scored.
  logits = model(input_ids=inputs, attention_mask=(inputs != PAD).long(),
                 decoder_input_ids=decoder_inputs).logits
  logp = torch.log_softmax(logits.float(), dim=-1)
  picked = torch.gather(logp, -1, targets[..., None])[..., 0].double().numpy()
  scores = (picked * (targets.numpy() != PAD)).sum(-1)
  return scores.reshape(n, c).tolist()


def fill(parameters, rng: torch.Generator, *, std: float, mean: float = 0.0) -> None:
  """Sets every tensor of `parameters` to mean + std * N(0, 1), drawn from `rng` in order."""
  with torch.no_grad():
    for p in parameters:
      p.copy_(mean + std * torch.randn(p.shape, generator=rng, dtype=p.dtype))


def peft_expert(kind: str, directory: pathlib.Path, inputs) -> list[list[float]]:
  """Adds a PEFT LoRA or IA3 expert with random weights, saves it, and returns the scores of
  the saved folder loaded on a fresh backbone (checked equal to the in-memory expert's)."""
  rng = torch.Generator().manual_seed(SEED + (1 if kind == "LORA" else 2))
  config = (LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **LORA) if kind == "LORA"
            else IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, **IA3))
  model = get_peft_model(backbone(), config).eval()
  for name, p in sorted(model.named_parameters()):
    if not p.requires_grad:
      continue
    if ".lora_A." in name or ".lora_B." in name:
      fill([p], rng, std=0.3)
    elif ".ia3_l." in name:
      fill([p], rng, std=0.3, mean=1.0)
    elif "modules_to_save" in name:  # the layer norms' trained copies
      with torch.no_grad():
        p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=rng))
    else:
      raise AssertionError(f"unexpected trainable parameter {name}")
  scores = choice_scores(model, *inputs)
  if directory.exists():
    shutil.rmtree(directory)
  model.save_pretrained(str(directory), safe_serialization=True)
  os.remove(directory / "README.md")  # PEFT's model card template: not part of the expert
  reloaded = PeftModel.from_pretrained(backbone(), str(directory)).eval()
  again = choice_scores(reloaded, *inputs)
  assert np.array_equal(scores, again), (kind, scores, again)
  return scores


def bottleneck_expert(directory: pathlib.Path, inputs) -> list[list[float]]:
  """The same for an `adapters` Houlsby bottleneck adapter (adapter.safetensors, no head)."""
  rng = torch.Generator().manual_seed(SEED + 3)
  model = backbone()
  adapters.init(model)
  model.add_adapter(ADAPTER_NAME, config=DoubleSeqBnConfig(**BOTTLENECK))
  model.set_active_adapters(ADAPTER_NAME)
  model.eval()
  named = sorted((n, p) for n, p in model.named_parameters() if f".adapters.{ADAPTER_NAME}." in n)
  for name, p in named:
    fill([p], rng, std=0.1 if name.endswith(".bias") else 0.4)
  scores = choice_scores(model, *inputs)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_adapter(tmp, ADAPTER_NAME, with_head=False, use_safetensors=True)
    kept = sorted(os.listdir(tmp))
    assert kept == ["adapter.safetensors", "adapter_config.json"], kept
    if directory.exists():
      shutil.rmtree(directory)
    shutil.copytree(tmp, directory)
  fresh = backbone()
  adapters.init(fresh)
  name = fresh.load_adapter(str(directory), use_safetensors=True, set_active=True)
  assert name == ADAPTER_NAME, name
  fresh.eval()
  again = choice_scores(fresh, *inputs)
  assert np.array_equal(scores, again), (scores, again)
  return scores


def main() -> int:
  if os.environ.get("PYTHONHASHSEED") != "0":
    # PEFT keeps target_modules in a set and writes it in set order, which follows str hashing.
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
  os.chdir(REPO)
  torch.manual_seed(SEED)
  OUT.mkdir(parents=True, exist_ok=True)
  base = backbone()
  inputs = choice_inputs(base.config.vocab_size)
  scores = {"base": choice_scores(base, *inputs),
            "peft_lora": peft_expert("LORA", OUT / "peft_lora", inputs),
            "peft_ia3": peft_expert("IA3", OUT / "peft_ia3", inputs),
            "adapters_bn": bottleneck_expert(OUT / "adapters_bn", inputs)}
  for name, values in scores.items():  # each expert moves the scores well beyond any tolerance
    if name != "base":
      moved = np.abs(np.subtract(values, scores["base"])).max()
      assert moved > 0.1, (name, moved)
  defaults = {"LORA": LoraConfig().to_dict(), "IA3": IA3Config().to_dict()}
  reference = {
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "adapters": adapters.__version__, "numpy": np.__version__},
      "backbone": BACKBONE,
      "encoder_tokens": inputs[0].tolist(),
      "choice_targets": inputs[1].tolist(),
      "scores": scores,
      "peft_defaults": json.loads(json.dumps(defaults, default=str)),
  }
  with open(OUT / "reference.json", "w") as f:
    json.dump(reference, f, indent=1, sort_keys=True)
    f.write("\n")
  for path in OUT.rglob("*"):
    path.chmod(0o755 if path.is_dir() else 0o644)
  print(f"wrote {OUT} (torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, adapters {adapters.__version__})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
