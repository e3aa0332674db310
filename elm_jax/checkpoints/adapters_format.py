"""Bottleneck adapters to and from the folders of AdapterHub's `adapters` package
(`model.save_adapter(dir, name, use_safetensors=True)`): `adapter_config.json` and
`adapter.safetensors`.

elm_jax's adapter (the paper's, `models/experts/adapter.py`) is Houlsby's placement: after the output
of each self-attention and each feed-forward sub-layer of both stacks, before the residual
addition, `h + up(gelu_tanh(down(h) + b_down)) + b_up`, bottleneck d_model // reduction_factor.
The `adapters` package computes exactly that for T5 with a `BnConfig` (its `DoubleSeqBnConfig`)
of mh_adapter and output_adapter true, cross_adapter false, original_ln_before false,
original_ln_after true, no adapter layer norms (ln_before, ln_after), not parallel, scaling 1.0,
no gating, no PHM layers, no invertible adapters, leave_out empty, an integer reduction_factor
and non_linearity `gelu_new` (tanh GELU). Tensors, per sub-layer `<stack>.block.<i>.layer.<j>`
(j: 0 self-attention, then 1 feed-forward in the encoder, 2 in the decoder):

  ours                                     adapters
  <sub-layer>_adapter/down_kernel [e, b]   <sub-layer>.adapters.<name>.adapter_down.0.weight [b, e]
  <sub-layer>_adapter/down_bias [b]        <sub-layer>.adapters.<name>.adapter_down.0.bias [b]
  <sub-layer>_adapter/up_kernel [b, e]     <sub-layer>.adapters.<name>.adapter_up.weight [e, b]
  <sub-layer>_adapter/up_bias [e]          <sub-layer>.adapters.<name>.adapter_up.bias [e]

What the format cannot express, refused with the reason instead of written to load differently:
- layer-norm scales trained with the adapter (`train_layer_norms`, the paper's default): an
  `adapters` folder holds only the adapter modules, and T5's layer norms are not among them;
- on import, every other configuration: Pfeiffer placement (original_ln_before: the adapter
  reads the sub-layer output plus its input), adapters after cross-attention (cross_adapter),
  only one of mh_adapter and output_adapter, parallel adapters, adapter layer norms, a scaling
  other than 1.0 (or learned), gating, PHM (Compacter) layers, invertible adapters, layers left
  out, per-layer reduction factors, and activations other than tanh GELU.
Dropout differs only in training: the package drops the sub-layer output before the adapter,
elm_jax after it; at inference neither drops anything.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from elm_jax.checkpoints import expert_files
from elm_jax.checkpoints.adapter_folders import (CONFIG_FILE, ImportedExpert, InterchangeError, hf_modules,
                                                 is_neutral, json_text, match_tensors, read_json_object,
                                                 read_safetensors, refuse, weights_file)
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.experts import adapter as adapter_kind
from elm_jax.models.t5_config import T5Config

WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = "adapters.1.3.0"  # the release whose folders these are (tests/golden/interchange)
MODEL_TYPES = ("t5", "mt5")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # tanh GELU, as elm_jax's adapter
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # adapter-transformers' names (no "version")
# The layer norm before each sub-layer that has an adapter after it, and that adapter's name.
_SUBLAYERS = {"pre_attention_layer_norm": "attention_adapter",
              "pre_self_attention_layer_norm": "self_attention_adapter",
              "pre_mlp_layer_norm": "mlp_adapter"}
_TENSORS = {"down_kernel": ("adapter_down.0.weight", True), "down_bias": ("adapter_down.0.bias", False),
            "up_kernel": ("adapter_up.weight", True), "up_bias": ("adapter_up.bias", False)}
_CONVERT = ("python -c \"import adapters; from transformers import AutoModelForSeq2SeqLM as M; "
            "m = M.from_pretrained('BASE_MODEL'); adapters.init(m); n = m.load_adapter('ADAPTER_DIR'); "
            "m.save_adapter('OUT_DIR', n, with_head=False, use_safetensors=True)\"")

# The `config` fields elm_jax's adapter fixes, the value it needs and why.
_FIXED = {
    "mh_adapter": (True, "elm_jax's adapter follows every self-attention sub-layer"),
    "output_adapter": (True, "elm_jax's adapter follows every feed-forward sub-layer"),
    "cross_adapter": (False, "elm_jax puts no adapter after cross-attention"),
    "original_ln_before": (False, "it adds the sub-layer's input to the adapter's input (Pfeiffer's placement); "
                                  "elm_jax's adapter reads the sub-layer output alone (Houlsby's)"),
    "original_ln_after": (True, "without it the sub-layer's residual connection is dropped"),
    "ln_before": (False, "elm_jax's adapter has no layer norm of its own"),
    "ln_after": (False, "elm_jax's adapter has no layer norm of its own"),
    "is_parallel": (False, "a parallel adapter reads the sub-layer's input; elm_jax's follows the sub-layer"),
    "use_gating": (False, "elm_jax's adapter has no gate"),
    "phm_layer": (False, "Compacter's PHM layers are not elm_jax's dense projections"),
    "inv_adapter": (None, "elm_jax has no invertible adapters on the embeddings"),
    "leave_out": ([], "elm_jax's adapters are in every layer"),
}
# Fields that change only training or initialisation, or only matter with a refused option.
_IGNORED = {"architecture", "reduction_factor", "non_linearity", "scaling", "init_weights", "init_weights_seed",
            "dropout", "stochastic_depth", "residual_before_ln", "adapter_residual_before_ln",
            "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule",
            "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity",
            "phm_rank", "phm_bias"}


def adapter_modules(model_config: T5Config) -> dict[tuple[str, ...], str]:
  """Our adapter module path -> its Hugging Face sub-layer: ('encoder', 'layers_0',
  'attention_adapter') -> 'encoder.block.0.layer.0' (from `hf_modules`' layer norms)."""
  out = {}
  for path, name in hf_modules(model_config).items():
    if path[-1] in _SUBLAYERS and name.endswith(".layer_norm"):
      out[path[:-1] + (_SUBLAYERS[path[-1]],)] = name[:-len(".layer_norm")]
  return out


def tensor_name(path: str, modules: Mapping[tuple[str, ...], str], name: str) -> tuple[str, bool]:
  """(the package's tensor name, whether it is stored transposed) of our parameter `path`."""
  *module, leaf = path.split("/")
  sublayer = modules.get(tuple(module))
  if sublayer is None or leaf not in _TENSORS:
    raise InterchangeError(f"parameter {path!r} has no counterpart in an `adapters` bottleneck adapter "
                           "(expected the down and up projections of an adapter after a self-attention "
                           "or feed-forward sub-layer)")
  suffix, transposed = _TENSORS[leaf]
  return f"{sublayer}.adapters.{name}.{suffix}", transposed


def _reduction_factor(config: Mapping[str, Any], source: str) -> int:
  factor = config.get("reduction_factor")
  number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
  if number and factor >= 1 and float(factor).is_integer():
    return int(factor)
  raise refuse(source, "config.reduction_factor", factor, "an integer of at least 1",
               "elm_jax's bottleneck is d_model // reduction_factor, the same in every layer")


def adapter_config(raw: Mapping[str, Any], source: str, model_config: T5Config) -> dict:
  """The ExpertConfig fields of an `adapters` bottleneck config (as a dict), or an error naming
  the field."""
  config = raw["config"]
  architecture = config.get("architecture")
  if architecture is not None:
    raise refuse(source, "config.architecture", architecture, "null (a bottleneck adapter)",
                 "elm_jax imports bottleneck adapters from AdapterHub; LoRA and IA3 come through PEFT")
  for field in sorted(config):
    value = config[field]
    if field in _FIXED:
      want, reason = _FIXED[field]
      if value != want or type(value) is not type(want):
        raise refuse(source, f"config.{field}", value, json_text(want), reason)
    elif field not in _IGNORED and not is_neutral(value):
      raise refuse(source, f"config.{field}", value, "null (or the field absent)",
                   "not an option of a bottleneck adapter that elm_jax computes")
  for field in ("mh_adapter", "output_adapter"):  # required by BnConfig; its other defaults are ours
    if field not in config:
      raise InterchangeError(f"{source}: field 'config.{field}' is missing; expected true")
  scaling = config.get("scaling", 1.0)
  if scaling != 1.0 or isinstance(scaling, bool):
    raise refuse(source, "config.scaling", scaling, "1.0", "elm_jax adds the adapter's output unscaled")
  activation = config.get("non_linearity")
  if "version" not in raw:
    activation = _LEGACY_ACTIVATIONS.get(activation, activation)
  if activation not in ACTIVATIONS:
    raise refuse(source, "config.non_linearity", config.get("non_linearity"), " or ".join(map(repr, ACTIVATIONS)),
                 "elm_jax's adapter uses the tanh approximation of GELU")
  model_type, hidden = raw.get("model_type"), raw.get("hidden_size")
  if model_type not in (None, *MODEL_TYPES):
    raise refuse(source, "model_type", model_type, " or ".join(map(repr, MODEL_TYPES)))
  if hidden is not None and hidden != model_config.emb_dim:
    raise refuse(source, "hidden_size", hidden, f"{model_config.emb_dim} (this backbone's d_model)")
  return {"kind": adapter_kind.KIND.name, "reduction_factor": _reduction_factor(config, source),
          "train_layer_norms": False}


def read_adapters(directory: str, model_config: T5Config) -> ImportedExpert:
  """The expert in the `adapters` folder `directory` for a backbone of `model_config`."""
  config_path = os.path.join(directory, CONFIG_FILE)
  raw = read_json_object(config_path)
  name = raw.get("name")
  if not isinstance(name, str) or not name:
    raise refuse(config_path, "name", name, "the adapter's name (its tensors are named after it)")
  fields = adapter_config(raw, config_path, model_config)
  weights = weights_file(directory, (WEIGHTS_FILE,), _CONVERT)
  found = read_safetensors(weights)
  if found and all(k.startswith("transformer.") for k in found):  # saved from T5AdapterModel
    found = {k[len("transformer."):]: v for k, v in found.items()}
  expected = expert_files.parameter_list(ExpertConfig(**fields), model_config, config_path)
  modules = adapter_modules(model_config)
  plan = {path: tensor_name(path, modules, name) for path in expected}
  shapes = {key: expected[path].shape[::-1] if transposed else expected[path].shape
            for path, (key, transposed) in plan.items()}
  match_tensors(weights, found, shapes,
                f"a bottleneck adapter {name!r} (reduction factor {fields['reduction_factor']}) after every "
                f"self-attention and feed-forward sub-layer of this backbone ({model_config.num_encoder_layers}+"
                f"{model_config.num_decoder_layers} layers)")
  return ImportedExpert(fields, {path: np.ascontiguousarray(found[key].T if transposed else found[key], np.float32)
                                 for path, (key, transposed) in plan.items()}, dict(raw))


def adapter_name(expert_name: str) -> str:
  """The adapter name an exported expert gets: its name with every character other than a
  letter, digit, '_' or '-' made '_' (a PyTorch module name holds no '.')."""
  return re.sub(r"[^A-Za-z0-9_-]", "_", expert_name) or "elm"


def to_adapters(flat: Mapping[str, np.ndarray], expert_config: ExpertConfig, model_config: T5Config,
                source: str, *, name: str, base_model: str, model_type: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json's object, {tensor name: array}) of an adapter expert's tensors."""
  if expert_config.expert_kind is not adapter_kind.KIND:
    raise InterchangeError(f"{source}: a {expert_config.kind!r} expert cannot be an `adapters` bottleneck "
                           "adapter (elm_jax exports its bottleneck adapters there; LoRA and IA3 experts go "
                           "to --format=peft)")
  if expert_config.train_layer_norms:
    raise InterchangeError(
        f"{source}: its expert config trains the layer-norm scales (train_layer_norms), which an `adapters` "
        "folder cannot hold (it saves only the adapter modules; T5's layer norms are not among them), and "
        "without them the adapter computes something else; export experts trained with "
        "train_layer_norms=False")
  if model_type not in MODEL_TYPES:
    raise InterchangeError(f"{source}: the backbone's model_type is {model_type!r}; expected one of {MODEL_TYPES}")
  adapter = adapter_name(name)
  modules = adapter_modules(model_config)
  tensors = {}
  for path, value in sorted(flat.items()):
    key, transposed = tensor_name(path, modules, adapter)
    tensors[key] = np.ascontiguousarray(np.asarray(value).T if transposed else value, np.float32)
  config = {
      "mh_adapter": True, "output_adapter": True, "reduction_factor": expert_config.reduction_factor,
      "non_linearity": "gelu_new", "original_ln_before": False, "original_ln_after": True, "ln_before": False,
      "ln_after": False, "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0,
      "use_gating": False, "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
      "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
      "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
      "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
      "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0}
  return ({"config": config, "hidden_size": model_config.emb_dim, "model_class": "T5ForConditionalGeneration",
           "model_name": base_model, "model_type": model_type, "name": adapter, "version": FORMAT_VERSION},
          tensors)
