"""T5 configuration and its Hugging Face form.

The parameter tree it implies follows the T5X checkpoint layout (``token_embedder/embedding``,
``encoder/layers_N/attention/query/kernel``, ``decoder/logits_dense/kernel`` ...), so that T5X
and Hugging Face checkpoints map onto it by a table; `models.t5.param_shapes` derives it from
the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from elm_jax.errors import UserInputError
from elm_jax.models.moe import MoeConfig


class ConfigError(UserInputError):
  """A configuration the model cannot represent."""


_HF_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-gelu": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gelu": ("gelu",),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "minimal", "full")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of an encoder-decoder T5.

  `mlp_activations` of length 2 means a gated feed-forward (`wi_0`, `wi_1`) as in T5 v1.1 and
  mT5; length 1 means the original T5's single `wi`. `logits_via_embedding` ties the output
  projection to the token embedding and scales the decoder output by 1/sqrt(emb_dim).
  `moe` makes the feed-forward of every `moe.layer_interval`-th layer of both stacks a sparse
  Mixture-of-Experts layer (`models/moe.py`); None is the dense model.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "float32"
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0
  moe: Optional[MoeConfig] = None
  # Log-softmax over the first N logits only (None: all `vocab_size`). The paper's code resizes
  # T5's 32,128-entry output layer to its tokenizer's 32,100 entries (resize_token_embeddings),
  # so its losses and scores normalise over 32,100; the ELM recipes set 32100.
  softmax_vocab_size: Optional[int] = None
  # Rematerialization of each encoder/decoder block in training (a `jax.checkpoint` policy):
  # "none" keeps every activation for the backward pass; "minimal" keeps only the products with
  # the weights that have no batch dimension and recomputes the rest of the block (t5x's
  # "minimal"); "full" keeps only each block's input and recomputes the whole block. It changes
  # memory and time, never the numbers; `elm-jax plan` shows the effect.
  remat_policy: str = "none"
  # Dropout of the embeddings, sub-layer outputs and final layer norms: False draws every
  # element (Hugging Face's T5, which the paper trained with); True draws one mask per feature
  # channel, shared along the sequence (T5X's T5 1.1, `broadcast_dims=(-2,)`). Feed-forward
  # hidden and attention-probability dropout are per element either way.
  dropout_broadcast_over_length: bool = False

  def __post_init__(self):
    if isinstance(self.moe, Mapping):  # as written to JSON metadata
      object.__setattr__(self, "moe", MoeConfig(**self.moe))
    if self.moe is not None and not isinstance(self.moe, MoeConfig):
      raise ConfigError(f"T5Config.moe: expected a MoeConfig or None, got {self.moe!r}")
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"T5Config.{name}: expected a positive integer, got {value!r}")
    if self.dtype not in _DTYPES:
      raise ConfigError(f"T5Config.dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
    acts = tuple(self.mlp_activations)
    if not 1 <= len(acts) <= 2 or any(a not in ("relu", "gelu", "linear") for a in acts):
      raise ConfigError(
          "T5Config.mlp_activations: expected ('relu',), ('gelu',), ('gelu', 'linear') or "
          f"('relu', 'linear'), got {self.mlp_activations!r}")
    object.__setattr__(self, "mlp_activations", acts)
    if self.softmax_vocab_size is not None and not (
        isinstance(self.softmax_vocab_size, int) and 0 < self.softmax_vocab_size <= self.vocab_size):
      raise ConfigError(f"T5Config.softmax_vocab_size: expected None or an integer in 1..vocab_size "
                        f"({self.vocab_size}), got {self.softmax_vocab_size!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"T5Config.remat_policy: expected one of {list(REMAT_POLICIES)}, "
                        f"got {self.remat_policy!r}")
    if not isinstance(self.dropout_broadcast_over_length, bool):
      raise ConfigError("T5Config.dropout_broadcast_over_length: expected true or false, got "
                        f"{self.dropout_broadcast_over_length!r}")
    if (isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, (int, float))
        or not 0.0 <= self.dropout_rate < 1.0):
      raise ConfigError(f"T5Config.dropout_rate: expected a number in [0, 1), got {self.dropout_rate!r}")

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def is_gated(self) -> bool:
    return len(self.mlp_activations) == 2

  def is_sparse(self, layer_index: int) -> bool:
    """Whether layer `layer_index` of either stack has a Mixture-of-Experts feed-forward."""
    return self.moe is not None and self.moe.is_sparse(layer_index)

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- Hugging Face form
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> "T5Config":
    """Builds a config from a Hugging Face T5/mT5 `config.json` dictionary."""
    def field(name, default=None):
      if name in hf:
        return hf[name]
      if default is None:
        raise ConfigError(f"{source}: missing field {name!r} needed for a T5 model")
      return default

    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; expected 't5' or 'mt5'")
    proj = field("feed_forward_proj", "relu")
    if proj not in _HF_ACTIVATIONS:
      raise ConfigError(
          f"{source}: field 'feed_forward_proj' is {proj!r}; expected one of {sorted(_HF_ACTIVATIONS)}")
    if hf.get("is_gated_act") is not None and hf["is_gated_act"] != proj.startswith("gated-"):
      raise ConfigError(f"{source}: field 'is_gated_act' disagrees with 'feed_forward_proj' {proj!r}")
    # transformers derives the activation from feed_forward_proj alone ('gated-gelu' is the
    # tanh approximation 'gelu_new'; plain 'gelu' is the exact erf GELU, which T5 never uses).
    runs = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    if runs not in ("relu", "gelu_new"):
      raise ConfigError(
          f"{source}: field 'feed_forward_proj' is {proj!r}, which runs the exact GELU; this model "
          "implements ReLU and the tanh-approximate GELU ('gated-gelu')")
    stated = hf.get("dense_act_fn")
    if stated is not None and stated != runs and {stated, runs} != {"gelu_new", "gelu_pytorch_tanh"}:
      raise ConfigError(f"{source}: field 'dense_act_fn' is {stated!r} but 'feed_forward_proj' "
                        f"{proj!r} runs {runs!r}")
    num_layers = field("num_layers")
    kwargs = dict(
        vocab_size=field("vocab_size"),
        emb_dim=field("d_model"),
        num_heads=field("num_heads"),
        head_dim=field("d_kv"),
        mlp_dim=field("d_ff"),
        num_encoder_layers=num_layers,
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        mlp_activations=_HF_ACTIVATIONS[proj],
        logits_via_embedding=bool(hf.get("tie_word_embeddings", True)),
        relative_attention_num_buckets=field("relative_attention_num_buckets", 32),
        relative_attention_max_distance=field("relative_attention_max_distance", 128),
        layer_norm_epsilon=float(field("layer_norm_epsilon", 1e-6)),
        pad_id=field("pad_token_id", 0),
        eos_id=field("eos_token_id", 1),
        decoder_start_id=field("decoder_start_token_id", 0),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_config(self, model_type: str = "t5") -> dict[str, Any]:
    """The Hugging Face `config.json` dictionary for this config."""
    if self.moe is not None:
      raise ConfigError("T5Config.moe: a Mixture-of-Experts T5 has no Hugging Face T5 config.json; "
                        "it is saved as an expert file (all parameters) over its dense checkpoint")
    acts = self.mlp_activations
    if acts == ("gelu",):
      raise ConfigError("T5Config.mlp_activations ('gelu',): Hugging Face T5 runs a non-gated "
                        "'gelu' as the exact GELU, so this config has no faithful config.json")
    proj = ("gated-" if self.is_gated else "") + acts[0]
    return {
        "architectures": ["T5ForConditionalGeneration" if model_type == "t5" else "MT5ForConditionalGeneration"],
        "model_type": model_type,
        "vocab_size": self.vocab_size,
        "d_model": self.emb_dim,
        "d_kv": self.head_dim,
        "d_ff": self.mlp_dim,
        "num_heads": self.num_heads,
        "num_layers": self.num_encoder_layers,
        "num_decoder_layers": self.num_decoder_layers,
        "feed_forward_proj": proj,
        "dense_act_fn": "gelu_new" if acts[0] == "gelu" else "relu",
        "is_gated_act": self.is_gated,
        "tie_word_embeddings": self.logits_via_embedding,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "dropout_rate": self.dropout_rate,
        "pad_token_id": self.pad_id,
        "eos_token_id": self.eos_id,
        "decoder_start_token_id": self.decoder_start_id,
        "is_encoder_decoder": True,
        "initializer_factor": 1.0,
    }
