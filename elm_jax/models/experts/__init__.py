"""Kinds of experts on a frozen T5, one module each, found by the package itself.

Each module of this package that defines `KIND` (an `ExpertKind`, see `base.py`) adds a kind:
`adapter` (the paper's bottleneck adapters), `lora`, `full` (full fine-tuning), ... `KINDS`
maps their names to them. Adding a kind is adding its module; nothing outside this package
compares kind names.

- `ExpertConfig`: what an expert trains (gin binds it as `adapters.ExpertConfig`); its `kind`
  names the kind, which validates the fields it reads.
- `ExpertSet`: the configurations one model is built with: one, or one per kind when experts of
  several kinds are stacked and scored together. The model hands it its hooks
  (`kernel`, `sublayer_output`, and `kernel_output`, `layer_norm_scale`, which change nothing
  here and which routing overrides); it tells which parameters the experts hold (`trains`) and the
  value an expert holds where its kind adds nothing (`neutral`).
- `split_params` / `merge_params`: a full parameter tree <-> (frozen backbone, expert).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Iterable, Optional, Union

import jax

from elm_jax import tree_paths
from elm_jax.models.experts.base import ExpertConfigError, ExpertKind, MergeError, is_layer_norm

__all__ = ["KINDS", "ExpertConfig", "ExpertConfigError", "ExpertKind", "ExpertSet", "MergeError",
           "count_parameters", "is_layer_norm", "merge_params", "split_params"]
Array = jax.Array


def _discover() -> dict[str, ExpertKind]:
  """{name: kind} of every module of this package that defines `KIND`, sorted by name."""
  found: dict[str, ExpertKind] = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f"{__name__}.{info.name}")
    kind = getattr(module, "KIND", None)
    if kind is None:
      continue
    if not isinstance(kind, ExpertKind) or not kind.name:
      raise TypeError(f"{module.__file__}: KIND must be a named ExpertKind, got {kind!r}")
    if kind.name in found:
      raise TypeError(f"{module.__file__}: a second expert kind named {kind.name!r}")
    found[kind.name] = kind
  return dict(sorted(found.items()))


KINDS: dict[str, ExpertKind] = _discover()


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """What an expert trains: `kind` names one of `KINDS` ('adapter', the paper's, by default),
  which reads its own fields: `reduction_factor` and `init_std` (adapters), `lora_rank`,
  `lora_alpha`, `lora_targets` (LoRA). `train_layer_norms` adds every layer-norm scale to the
  expert (the paper does, for adapters). Each kind's module says what it builds."""
  kind: str = "adapter"
  reduction_factor: int = 32
  init_std: float = 0.01
  train_layer_norms: bool = True
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ExpertConfigError(f"ExpertConfig.kind: expected one of {tuple(KINDS)}, got {self.kind!r}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    self.expert_kind.validate(self)

  @property
  def expert_kind(self) -> ExpertKind:
    return KINDS[self.kind]

  @property
  def trains_backbone(self) -> bool:
    """Whether the expert holds every backbone parameter (full fine-tuning)."""
    return self.expert_kind.trains_backbone

  @property
  def label(self) -> str:
    return self.kind

  def trains(self, path: str) -> bool:
    """Whether the expert holds the parameter at `path` ('encoder/layers_0/mlp_adapter/up_kernel')."""
    return self.expert_kind.trains(path, self)

  def describe(self) -> str:
    return self.expert_kind.describe(self)

  def settings(self) -> tuple:
    """What builds the expert: the kind, `train_layer_norms` and the fields the kind reads."""
    return (self.kind, self.train_layer_norms) + tuple(getattr(self, f) for f in self.expert_kind.fields)


@dataclasses.dataclass(frozen=True)
class ExpertSet:
  """The expert configurations a model is built with, at most one per kind (sorted by kind):
  every expert run on the model holds the parameters of all of them (`trains`); an expert of
  one kind holds, where another kind adds a module, that kind's identity (`neutral`)."""
  configs: tuple[ExpertConfig, ...]

  @classmethod
  def of(cls, expert: Union[None, ExpertConfig, "ExpertSet", Iterable[ExpertConfig]]) -> Optional["ExpertSet"]:
    """The set of `expert` (one config, several, or a set; None stays None). Two configs of one
    kind that build different experts (`ExpertConfig.settings`) are refused."""
    if expert is None or isinstance(expert, ExpertSet):
      return expert
    configs = (expert,) if isinstance(expert, ExpertConfig) else tuple(expert)
    chosen: dict[str, ExpertConfig] = {}
    for config in configs:
      first = chosen.setdefault(config.kind, config)
      if first.settings() != config.settings():
        raise ExpertConfigError(f"experts of kind {config.kind!r} with two configurations ({first} and {config}) "
                                "cannot run on one model; stack experts of one configuration per kind")
    if not chosen:
      raise ExpertConfigError("ExpertSet: expected at least one expert configuration")
    return cls(tuple(chosen[k] for k in sorted(chosen)))

  @property
  def single(self) -> Optional[ExpertConfig]:
    """The configuration, when there is one; None for several kinds."""
    return self.configs[0] if len(self.configs) == 1 else None

  @property
  def label(self) -> str:
    return "+".join(c.kind for c in self.configs)

  @property
  def trains_backbone(self) -> bool:
    return any(c.trains_backbone for c in self.configs)

  def trains(self, path: str) -> bool:
    return any(c.trains(path) for c in self.configs)

  def describe(self) -> str:
    return "; ".join(c.describe() for c in self.configs)

  def neutral(self, path: str) -> Optional[float]:
    """The identity of the kind that adds the parameter at `path`, or None for a parameter of
    the backbone (an expert that does not train it holds the pretrained value)."""
    for config in self.configs:
      if config.expert_kind.adds(path):
        return config.expert_kind.identity(path)
    return None

  def kernel(self, module, kernel: Array) -> Array:
    """`ExpertKind.kernel` of every kind in turn."""
    for config in self.configs:
      kernel = config.expert_kind.kernel(config, module, kernel)
    return kernel

  def sublayer_output(self, module, site: str, h: Array) -> Array:
    """`ExpertKind.sublayer_output` of every kind in turn."""
    for config in self.configs:
      h = config.expert_kind.sublayer_output(config, module, site, h)
    return h

  def kernel_output(self, module, kernel: Array, x: Array, y: Array) -> Array:
    """The output of kernel `module` given y = x @ kernel: y itself (the kinds' kernels are
    already in `kernel`); routing mixes the experts' changes here (`models/routing.py`)."""
    return y

  def layer_norm_scale(self, module, x: Array, scale: Array) -> Array:
    """The scale layer norm `module` multiplies its normalised input x by: its own parameter
    (an expert that trains it holds it in its tree); routing mixes the experts' here."""
    return scale


def split_params(params: dict, expert: Union[ExpertConfig, ExpertSet]) -> tuple[dict, dict]:
  """Full tree -> (frozen backbone tree, expert tree: the leaves `expert` trains); together
  they hold every leaf once."""
  experts = ExpertSet.of(expert)
  flat = tree_paths.flatten(params)
  held = {p: v for p, v in flat.items() if experts.trains(tree_paths.join(p))}
  backbone = {p: v for p, v in flat.items() if p not in held}
  return tree_paths.unflatten(backbone), tree_paths.unflatten(held)


def merge_params(backbone: dict, expert: dict) -> dict:
  """Inverse of `split_params`: expert leaves override or extend the backbone's."""
  flat = tree_paths.flatten(backbone)
  flat.update(tree_paths.flatten(expert))
  return tree_paths.unflatten(flat)


def count_parameters(tree: dict) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
