"""What every kind of expert defines (`ExpertKind`), and the errors its configuration and its
merges raise.

A kind is one module of this package holding one `ExpertKind` as `KIND`; the package finds it
by itself (`elm_jax.models.experts.kinds`). The T5 code names no kind: it calls two hooks, and
each kind decides from the module path it is handed whether to act there:

- `kernel(config, module, kernel)`: every `layers.Kernel` of an attention or dense feed-forward
  block passes its kernel through it (LoRA adds `a @ b` to it); parameters created on
  `module` live beside the kernel (`.../attention/query/lora_a`);
- `sublayer_output(config, module, site, h)`: the output `h` [batch, length, embed] of every
  sub-layer of a block passes through it, `site` naming the sub-layer (`attention`,
  `self_attention`, `encoder_decoder_attention`, `mlp`) and `module` the block; sub-modules
  created there live in the block (`.../layers_0/mlp_adapter`).

Routing (`models/routing.py`) runs E experts at once over one backbone and mixes their outputs
per token or per example; for that a kind says what one expert changes, as a pure function of
that expert's own parameters (no module is created), which routing vmaps over the experts:

- `kernel_delta(config, module, params, kernel, x, y)`: the change to the output `y = x @ kernel`
  of a `layers.Kernel`;
- `sublayer_delta(config, module, site, params, h)`: the change to a sub-layer's output `h`;
- `arrow_prototypes(config, params)`: the unit vectors Arrow routes by, per routed module (a
  kind without them says why in `arrow_refusal`).

Parameters declare their logical axes as they are created (`layers.param_with_axes`), and their
initialisers are the kind's own.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from elm_jax.errors import UserInputError

Array = jax.Array
Path = tuple[str, ...]

# Every layer-norm scale of a T5: the blocks' and the stacks' final ones.
_LAYER_NORM = re.compile(r"(^|/)(pre_\w+_layer_norm|encoder_norm|decoder_norm)/scale$")


class ExpertConfigError(UserInputError):
  """An expert configuration the model cannot build."""


class MergeError(UserInputError):
  """Experts (or weights, base, density) that cannot be merged; names the parameter and expert."""


def is_layer_norm(path: str) -> bool:
  """Whether `path` ('encoder/layers_0/pre_mlp_layer_norm/scale') is a layer-norm scale."""
  return bool(_LAYER_NORM.search(path))


class ExpertKind:
  """One kind of expert: the fields of `ExpertConfig` it reads, the parameters it adds and
  trains, its two hooks into the backbone, its identity for task arithmetic and its own merges.

  The base class is a kind that adds and changes nothing; a kind overrides what it needs.
  `config` arguments are `ExpertConfig`s of this kind."""
  name: str = ""
  # The ExpertConfig fields this kind reads besides `kind` and `train_layer_norms`: two configs
  # of the kind that agree on them (and on `train_layer_norms`) build the same expert.
  fields: tuple[str, ...] = ()
  # Whether its experts hold (and train) every backbone parameter: full fine-tuning.
  trains_backbone: bool = False
  # Its own merge methods (`merge`), beyond those every kind has (library/merging.py).
  merge_methods: tuple[str, ...] = ()

  def validate(self, config) -> None:
    """Raises `ExpertConfigError`, naming the field, when `config` cannot build this kind."""

  def describe(self, config) -> str:
    """The experts of `config` in words ('adapters (reduction factor 32)')."""
    return f"{self.name} experts"

  # ------------------------------------------------------------------ parameters
  def adds(self, path: str) -> bool:
    """Whether the parameter at `path` ('encoder/layers_0/mlp_adapter/up_kernel') is one this
    kind adds to the backbone (the backbone has no such parameter)."""
    return False

  def trains(self, path: str, config) -> bool:
    """Whether an expert of `config` holds the parameter at `path`: every parameter when the
    kind trains the backbone; else what it adds, and the layer-norm scales when
    `config.train_layer_norms`."""
    if self.trains_backbone or self.adds(path):
      return True
    return bool(config.train_layer_norms and is_layer_norm(path))

  def identity(self, path: str) -> float:
    """The value of the added parameter at `path` at which the kind leaves the backbone
    unchanged: the base of its task vectors, and what an expert of another kind holds there
    when experts of several kinds are stacked together."""
    return 0.0

  # ------------------------------------------------------------------ hooks
  def kernel(self, config, module, kernel: Array) -> Array:
    """The kernel `module` (a `layers.Kernel`, at `module.path`, of `module.shape` and logical
    `module.axes`) computes with, given its own `kernel`."""
    return kernel

  def sublayer_output(self, config, module, site: str, h: Array) -> Array:
    """The output of sub-layer `site` of block `module` (at `module.path`), given its own `h`
    [batch, length, embed]."""
    return h

  # ------------------------------------------------------------------ routing
  # Why experts of this kind cannot be routed at all; None when they can.
  routing_refusal: Optional[str] = None
  # Why Arrow cannot route experts of this kind; None when `arrow_prototypes` gives their
  # prototypes.
  arrow_refusal: Optional[str] = "it adds no module Arrow can take a prototype from"

  def kernel_delta(self, config, module, params: Mapping[str, Array], kernel: Array, x: Array,
                   y: Array) -> Optional[Array]:
    """What one expert adds to the output `y = x @ kernel` [..., out] of `module` (a
    `layers.Kernel`; x [..., in] and y in the compute dtype, `kernel` the backbone's), given
    `params`, that expert's parameters this kind keeps at `module` ({'lora_a': [in, rank],
    ...}, unstacked). None: the kind changes nothing there. The expert's own output is y plus it."""
    return None

  def sublayer_delta(self, config, module, site: str, params: Mapping[str, Any], h: Array) -> Optional[Array]:
    """What one expert adds to the output `h` [batch, length, embed] of sub-layer `site` of
    block `module`, given `params`, that expert's parameters in the block (nested as stored:
    {'mlp_adapter': {'down_kernel': ...}, ...}). None: the kind changes nothing there."""
    return None

  def arrow_prototypes(self, config, params: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    """Arrow's prototypes of one expert, from its flat parameters {path: array}: {path of the
    routed module (a kernel's module path, or a block's path + (site,)): unit vector [in]
    float64 in the space of that module's input}. Only kinds whose `arrow_refusal` is None
    define them."""
    return {}

  # ------------------------------------------------------------------ merging
  def merge(self, method: str, stacked: Mapping[Path, np.ndarray], weights: np.ndarray
            ) -> tuple[dict[Path, np.ndarray], dict[str, Any]]:
    """One of `merge_methods` over k experts: stacked {path: float64 [k, ...]} (checked to hold
    the same leaves), weights [k] summing to 1 -> ({path: float64 merged leaf}, the changes to
    the experts' ExpertConfig the merged expert is saved with)."""
    raise MergeError(f"--method={method}: not a merge of {self.name!r} experts")
