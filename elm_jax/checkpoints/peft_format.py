"""LoRA and IA3 experts to and from PEFT folders: `adapter_config.json` and
`adapter_model.safetensors`, as PEFT's `save_pretrained` writes them for a T5
(`task_type` SEQ_2_SEQ_LM).

Tensors are named `base_model.model.<Hugging Face module>.<tensor>` (`adapter_folders.hf_modules`:
`encoder.block.0.layer.0.SelfAttention.q`, `decoder.block.0.layer.1.EncDecAttention.v`,
`encoder.block.0.layer.1.DenseReluDense.wi_0`, ...):

  ours                                   PEFT
  .../<projection>/lora_a [in, rank]     <module>.lora_A.weight [rank, in]   (transposed)
  .../<projection>/lora_b [rank, out]    <module>.lora_B.weight [out, rank]  (transposed)
  .../<layer norm>/scale [embed]         <norm module>.weight [embed]        (modules_to_save)
  .../{key,value}/ia3_scale [joined_kv]  <k or v module>.ia3_l [joined_kv, 1]
  .../mlp/wo/ia3_scale [mlp]             <wo module>.ia3_l [1, mlp]           (feedforward_modules)

For LoRA both compute the projection's kernel plus (lora_alpha / r) * A B, on every layer and
every attention (cross-attention included) of the targets: q, k, v, o (`query`, `key`,
`value`, `out`) and wi_0, wi_1, wi, wo. For IA3 (PEFT's target_modules k, v, wo with
feedforward_modules wo: its default for T5, and T-Few's recipe) both scale the outputs of k
and v in every attention and the input of every wo. An expert of either kind that trains the
layer-norm scales (`train_layer_norms`) carries them as PEFT's `modules_to_save`
["layer_norm", "final_layer_norm"] (PEFT matches a name by suffix, so these are every T5 layer
norm), which PEFT saves and loads whole: the same numbers, and a PEFT user gets the expert as
trained rather than without the scales it learned.

A PEFT configuration elm_jax cannot compute exactly is refused on import, naming the file, the
field and what was expected (`_LORA_FIXED`, `_LORA_UNSUPPORTED` and IA3's; any field not listed
must be absent or null, false or empty). Fields that change only training or initialisation
(dropout, LoftQ/EVA/CorDA set-up, inference_mode, ...) are recorded and ignored, except an
initialisation that rewrites the base model's weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA):
such an adapter works only on that rewritten base.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from elm_jax.checkpoints import expert_files
from elm_jax.checkpoints.adapter_folders import (CONFIG_FILE, ImportedExpert, InterchangeError, hf_modules,
                                                 is_neutral, json_text, match_tensors, read_json_object,
                                                 read_safetensors, refuse, weights_file)
from elm_jax.checkpoints.hf import hf_name_table
from elm_jax.models.experts import ExpertConfig, ia3, lora
from elm_jax.models.t5_config import T5Config

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPE = "SEQ_2_SEQ_LM"
# Our LoRA projections and their Hugging Face T5 module names, in the order elm_jax lists them.
PROJECTIONS = {"query": "q", "key": "k", "value": "v", "out": "o", "wi_0": "wi_0", "wi_1": "wi_1",
               "wi": "wi", "wo": "wo"}
NORM_MODULES = ["layer_norm", "final_layer_norm"]  # modules_to_save: every T5 layer norm
_CONVERT = ("python -c \"from peft import PeftModel; from transformers import AutoModelForSeq2SeqLM as M; "
            "PeftModel.from_pretrained(M.from_pretrained('BASE_MODEL'), 'PEFT_DIR')"
            ".save_pretrained('OUT_DIR', safe_serialization=True)\"")

# Fields whose only value elm_jax computes, with the reason.
_LORA_FIXED = {
    "bias": ("none", "elm_jax's LoRA trains no biases (T5's projections have none)"),
    "fan_in_fan_out": (False, "T5's projections are torch Linear layers, weights stored [out, in]"),
    "use_rslora": (False, "rank-stabilised LoRA scales by lora_alpha / sqrt(r); elm_jax's by lora_alpha / r"),
    "use_dora": (False, "DoRA's magnitude vectors and weight normalisation are not part of elm_jax's LoRA"),
    "lora_bias": (False, "elm_jax's LoRA has no bias on lora_B"),
    "use_qalora": (False, "QA-LoRA pools the input of a quantised layer; elm_jax's LoRA reads it whole"),
}
# Fields that must be absent, null or empty, with the reason.
_LORA_UNSUPPORTED = {
    "rank_pattern": "elm_jax's LoRA has one rank for every projection",
    "alpha_pattern": "elm_jax's LoRA has one lora_alpha for every projection",
    "layers_to_transform": "elm_jax's LoRA adapts its projections in every layer",
    "layers_pattern": "elm_jax's LoRA adapts its projections in every layer",
    "exclude_modules": "elm_jax's LoRA adapts its projections in every layer and every attention",
    "layer_replication": "elm_jax's T5 has no replicated layers",
    "target_parameters": "elm_jax's LoRA adapts modules, not parameters",
    "trainable_token_indices": "elm_jax's experts train no token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA) depends on the tokens seen; elm_jax's LoRA is always on",
    "megatron_config": "elm_jax's T5 has no Megatron layers",
}
# Fields that change only training or initialisation, never what a saved adapter computes.
_LORA_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                 "lora_dropout", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
                 "qalora_group_size", "runtime_config", "ensure_weight_tying", "init_lora_weights"}
# init_lora_weights values that leave the base model's weights as they were.
_LORA_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _check_fields(raw: Mapping[str, Any], source: str, fixed: Mapping[str, tuple[Any, str]],
                  unsupported: Mapping[str, str], handled: set[str], what: str) -> None:
  """Refuses the first field of `raw` that is not `handled` (checked by the caller) or ignored
  and holds a value other than its `fixed` one or, for every other field, other than absent,
  null, false or empty."""
  for field in sorted(raw):
    value = raw[field]
    if field in handled:
      continue
    if field in fixed:
      want, reason = fixed[field]
      if value != want or type(value) is not type(want):
        raise refuse(source, field, value, json_text(want), reason)
    elif not is_neutral(value):
      raise refuse(source, field, value, "null (or the field absent)",
                   unsupported.get(field, f"not an option of {what} that elm_jax computes"))


def _module_names(model_config: T5Config) -> list[str]:
  """Every Hugging Face module of the backbone that holds a weight (projections, layer norms,
  embedding, relative-position tables, lm_head)."""
  return sorted({name.rsplit(".", 1)[0] for name in hf_name_table(model_config)})


def _targets(raw: Mapping[str, Any], source: str, model_config: T5Config, allowed: Mapping[str, str],
             method: str, field: str = "target_modules") -> list[str]:
  """Our projection names (in `allowed`'s order) that the config's `field` selects, matched as
  PEFT matches module names: a list entry by the whole name or a dotted suffix ('q' selects
  every '....q'), a string as a full regex. Selecting another module (lm_head, a layer norm,
  ...) is refused, and so is selecting a projection in some layers or attentions but not all;
  a list entry that selects nothing is ignored, as PEFT does."""
  targets = raw.get(field)
  modules = _module_names(model_config)
  ours = {hf: name for name, hf in allowed.items()}
  expected = f"a list of {method} modules among {', '.join(allowed.values())} (or a regex over module names)"
  if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
    selected = [m for m in modules if any(m == t or m.endswith("." + t) for t in targets)]
  elif isinstance(targets, str) and targets:
    try:
      selected = [m for m in modules if re.fullmatch(targets, m)]
    except re.error as e:
      raise refuse(source, field, targets, expected, f"not a valid regex ({e})") from None
  else:
    raise refuse(source, field, targets, expected)
  if not selected:
    raise refuse(source, field, targets, expected, "it selects no module of this backbone")
  leaf = lambda module: module.rsplit(".", 1)[-1]
  kinds = sorted({leaf(m) for m in selected})
  for kind in kinds:
    if kind not in ours:
      example = next(m for m in selected if leaf(m) == kind)
      raise refuse(source, field, targets, expected, f"it selects {example!r}, which elm_jax's {method} does "
                   "not adapt")
    left = [m for m in modules if leaf(m) == kind and m not in selected]
    if left:
      raise refuse(source, field, targets, expected, f"it selects some {kind!r} modules but not {left[0]!r}; "
                   f"elm_jax's {method} adapts a projection in every layer and every attention")
  return [name for name, hf in allowed.items() if hf in kinds]


def _norms(raw: Mapping[str, Any], source: str) -> bool:
  """Whether `modules_to_save` holds T5's layer norms (train_layer_norms); anything else refused."""
  saved = raw.get("modules_to_save")
  if is_neutral(saved):
    return False
  if not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)
          and all(any(n.endswith(m) for n in NORM_MODULES) for m in saved)):
    raise refuse(source, "modules_to_save", saved, f"null or {NORM_MODULES} (every T5 layer norm)",
                 "elm_jax's experts carry no other whole module")
  return True


def _common(raw: Mapping[str, Any], source: str) -> None:
  task = raw.get("task_type")
  if task not in (None, TASK_TYPE):
    raise refuse(source, "task_type", task, f"{TASK_TYPE!r}", "elm_jax runs T5 as a sequence-to-sequence LM")


def lora_config(raw: Mapping[str, Any], source: str, model_config: T5Config) -> dict:
  """The ExpertConfig fields of a PEFT LoraConfig (as a dict), or an error naming the field."""
  _common(raw, source)
  _check_fields(raw, source, _LORA_FIXED, _LORA_UNSUPPORTED,
                {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "modules_to_save"} | _LORA_IGNORED,
                "LoRA")
  init = raw.get("init_lora_weights", True)
  if not any(init == ok and type(init) is type(ok) for ok in _LORA_INITS):
    raise refuse(source, "init_lora_weights", init, " or ".join(json_text(v) for v in _LORA_INITS),
                 "PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base model's weights, and the adapter "
                 "works only on that rewritten base (PEFT converts such an adapter to a plain LoRA with "
                 "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
  rank, alpha = raw.get("r"), raw.get("lora_alpha")
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise refuse(source, "r", rank, "a positive integer (the LoRA rank)")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
    raise refuse(source, "lora_alpha", alpha, "a finite number")
  return {"kind": lora.KIND.name, "lora_rank": rank, "lora_alpha": float(alpha),
          "lora_targets": _targets(raw, source, model_config, PROJECTIONS, "LoRA"),
          "train_layer_norms": _norms(raw, source)}


# ------------------------------------------------------------------------------------ IA3
# IA3 (T-Few): learned vectors scale the keys, the values and the feed-forward's inner activation
# (wo's input). PEFT stores them as `<module>.ia3_l`: [out, 1] for k and v, [1, in] for wo (a
# `feedforward_modules` entry scales its input).
IA3_PROJECTIONS = {"key": "k", "value": "v", "wo": "wo"}
_IA3_FIXED = {"fan_in_fan_out": _LORA_FIXED["fan_in_fan_out"]}
_IA3_UNSUPPORTED = {"exclude_modules": "elm_jax's IA3 scales k, v and wo in every layer and every attention"}
_IA3_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                "init_ia3_weights"}


def ia3_config(raw: Mapping[str, Any], source: str, model_config: T5Config) -> dict:
  """The ExpertConfig fields of a PEFT IA3Config (as a dict), or an error naming the field."""
  _common(raw, source)
  handled = {"peft_type", "task_type", "target_modules", "feedforward_modules", "modules_to_save"}
  _check_fields(raw, source, _IA3_FIXED, _IA3_UNSUPPORTED, handled | _IA3_IGNORED, "IA3")
  reason = ("elm_jax's IA3 scales the keys and values of every attention and the input of every wo "
            "(the T-Few recipe)")
  targets = _targets(raw, source, model_config, IA3_PROJECTIONS, "IA3")
  if targets != list(IA3_PROJECTIONS):
    raise refuse(source, "target_modules", raw.get("target_modules"), json_text(list(IA3_PROJECTIONS.values())),
                  reason)
  if _targets(raw, source, model_config, IA3_PROJECTIONS, "IA3", "feedforward_modules") != ["wo"]:
    raise refuse(source, "feedforward_modules", raw.get("feedforward_modules"), json_text(["wo"]), reason)
  return {"kind": ia3.KIND.name, "train_layer_norms": _norms(raw, source)}


def ia3_peft_config(expert_config: ExpertConfig, base_model: str) -> dict:
  """adapter_config.json's object for an IA3 expert."""
  return {"peft_type": "IA3", "task_type": TASK_TYPE, "base_model_name_or_path": base_model, "revision": None,
          "target_modules": list(IA3_PROJECTIONS.values()), "feedforward_modules": ["wo"],
          "modules_to_save": list(NORM_MODULES) if expert_config.train_layer_norms else None,
          "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True}


# ------------------------------------------------------------------------------ tensor names
def tensor_name(path: str, modules: Mapping[tuple[str, ...], str]) -> tuple[str, Callable, Callable]:
  """(PEFT tensor name, ours -> PEFT array, PEFT -> ours array) of our expert parameter `path`
  ('encoder/layers_0/attention/query/lora_a')."""
  *module, leaf = path.split("/")
  hf_module = modules.get(tuple(module))
  transpose = lambda x: np.ascontiguousarray(np.asarray(x).T)
  if hf_module is not None:
    name = PREFIX + hf_module
    if leaf == "lora_a":
      return name + ".lora_A.weight", transpose, transpose
    if leaf == "lora_b":
      return name + ".lora_B.weight", transpose, transpose
    if leaf == "scale":
      return name + ".weight", np.asarray, np.asarray
    if leaf == ia3.NAME:
      column = module[-1] == "wo"  # scales wo's input: PEFT's feedforward [1, in]; else [out, 1]
      return (name + ".ia3_l", lambda x: np.asarray(x).reshape((1, -1) if column else (-1, 1)),
              lambda x: np.asarray(x).reshape(-1))
  raise InterchangeError(f"parameter {path!r} has no PEFT counterpart (expected a LoRA factor, an "
                         "IA3 scale or a layer-norm scale of a T5 module)")


def _peft_shape(shape: tuple[int, ...], to_peft: Callable) -> tuple[int, ...]:
  return to_peft(np.empty(shape, np.float32)).shape


# -------------------------------------------------------------------------------- reading
def read_peft(directory: str, model_config: T5Config) -> ImportedExpert:
  """The expert in the PEFT folder `directory` for a backbone of `model_config`."""
  config_path = os.path.join(directory, CONFIG_FILE)
  raw = read_json_object(config_path)
  peft_type = raw.get("peft_type")
  if peft_type == "LORA":
    fields = lora_config(raw, config_path, model_config)
  elif peft_type == "IA3":
    fields = ia3_config(raw, config_path, model_config)
  else:
    raise refuse(config_path, "peft_type", peft_type, "'LORA' or 'IA3'", "elm_jax imports no other PEFT method")
  weights = weights_file(directory, (WEIGHTS_FILE,), _CONVERT)
  found = read_safetensors(weights)
  modules = hf_modules(model_config)
  expected = expert_files.parameter_list(ExpertConfig(**fields), model_config, config_path)
  plan = {path: tensor_name(path, modules) for path in expected}
  match_tensors(weights, found, {name: _peft_shape(expected[path].shape, to_peft)
                                 for path, (name, to_peft, _) in plan.items()},
                f"the expert {CONFIG_FILE} describes, {_describe(fields)}, on this backbone "
                f"({model_config.num_encoder_layers}+{model_config.num_decoder_layers} layers)")
  return ImportedExpert(fields, {path: np.asarray(from_peft(found[name]), np.float32)
                                 for path, (name, _, from_peft) in plan.items()}, dict(raw))


def _describe(fields: Mapping[str, Any]) -> str:
  what = ExpertConfig(**fields).describe()
  return what + (" and every layer norm" if fields.get("train_layer_norms") else "")


# -------------------------------------------------------------------------------- writing
def to_peft(flat: Mapping[str, np.ndarray], expert_config: ExpertConfig, model_config: T5Config,
            base_model: str, source: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json's object, {PEFT tensor name: array}) of an expert's tensors."""
  if expert_config.expert_kind is lora.KIND:
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPE, "base_model_name_or_path": base_model, "revision": None,
        "r": expert_config.lora_rank, "lora_alpha": expert_config.lora_alpha,
        "target_modules": [PROJECTIONS[t] for t in expert_config.lora_targets],
        "modules_to_save": list(NORM_MODULES) if expert_config.train_layer_norms else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}}
  elif expert_config.expert_kind is ia3.KIND:
    config = ia3_peft_config(expert_config, base_model)
  else:
    raise InterchangeError(f"{source}: a {expert_config.kind!r} expert cannot be a PEFT adapter (elm_jax "
                           "exports its LoRA and IA3 experts to PEFT; bottleneck adapters go to "
                           "--format=adapters)")
  modules = hf_modules(model_config)
  tensors = {}
  for path, value in sorted(flat.items()):
    name, to_peft_array, _ = tensor_name(path, modules)
    tensors[name] = np.asarray(to_peft_array(value), np.float32)
  return config, tensors
