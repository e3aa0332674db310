"""The expert stack: E experts' trainable parameters as one tree of [E, ...] arrays.

Training updates a stack in one vmapped step, evaluation scores a stack in one vmapped pass,
merging averages over a stack's leading axis; this module is the one place that builds,
slices, chunks, shards and loads it:

- `ExpertStack`: names and the stacked tree of one expert configuration, or of several kinds
  (each expert then holds every kind's parameters, its own and the others' identities:
  `stack_mixed`); built from expert trees or expert files once (`from_trees`, `load`), then
  sliced (`select`, `tree`) without ever being unstacked and restacked;
- `chunks`: fixed-size chunks of the leading axis (the last padded by repeating an expert, so
  one compiled program serves every chunk);
- `leading_axis_specs` / `place`: the logical axes of a stacked tree the model does not
  describe (optimizer state; the model gives its experts' own, `EncoderDecoderModel.expert_specs`)
  and a stack's placement on a mesh;
- `ExpertsOnBackbone`: a stack with the frozen backbone and model it runs on, what evaluation
  and retrieval take.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

from elm_jax import tree_paths
from elm_jax.checkpoints import expert_files
from elm_jax.errors import UserInputError
from elm_jax.models.experts import ExpertConfig, ExpertConfigError, ExpertSet
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config
from elm_jax.vocabularies import SentencePieceVocabulary


class ExpertStackError(UserInputError):
  """Experts that cannot be stacked together (other parameters or shapes, other configs)."""


def num_experts(params: Any) -> int:
  """The leading (expert) dimension of a stacked tree."""
  return int(jax.tree_util.tree_leaves(params)[0].shape[0])


def stack_trees(trees: Sequence[Mapping], names: Sequence[str]) -> dict:
  """k expert trees -> one tree of [k, ...] numpy arrays; an expert that lacks, adds or
  reshapes a parameter of the first is refused, naming both."""
  if not trees:
    raise ExpertStackError("no experts to stack")
  flats = [tree_paths.flatten(tree) for tree in trees]
  for name, flat in zip(names[1:], flats[1:]):
    for path in sorted(set(flats[0]) ^ set(flat)):
      where = "lacks" if path in flats[0] else "adds"
      raise ExpertStackError(f"expert {name!r} {where} parameter {tree_paths.join(path)!r} "
                             f"(compared with {names[0]!r}); experts stacked together hold the same parameters")
    for path, value in flat.items():
      if np.shape(value) != np.shape(flats[0][path]):
        raise ExpertStackError(f"expert {name!r}: parameter {tree_paths.join(path)!r} has shape "
                               f"{np.shape(value)}, {names[0]!r} has {np.shape(flats[0][path])}")
  return tree_paths.unflatten({p: np.stack([np.asarray(f[p]) for f in flats]) for p in flats[0]})


def stack_mixed(trees: Sequence[Mapping], configs: Sequence[ExpertConfig], names: Sequence[str],
                pretrained: Optional[Mapping] = None) -> tuple[dict, ExpertSet]:
  """Experts of several kinds -> (one tree of [k, ...] numpy arrays holding every parameter any
  of them holds, their `ExpertSet`). Where an expert lacks a parameter, it holds the identity of
  the kind that adds it (an adapter's zeros, a scale's ones: the module then changes
  nothing) or, for a backbone parameter another expert trains (a layer-norm scale), its value
  in `pretrained` (the full pretrained tree; refused without it). Two experts of one kind must
  share one configuration."""
  try:
    experts = ExpertSet.of(configs)
  except ExpertConfigError as e:
    raise ExpertStackError(str(e)) from None
  flats = [tree_paths.flatten(tree) for tree in trees]
  shapes: dict = {}
  for name, flat in zip(names, flats):
    for path, value in flat.items():
      first = shapes.setdefault(path, (name, np.shape(value)))
      if first[1] != np.shape(value):
        raise ExpertStackError(f"expert {name!r}: parameter {tree_paths.join(path)!r} has shape "
                               f"{np.shape(value)}, {first[0]!r} has {first[1]}")
  given = tree_paths.flatten(pretrained) if pretrained is not None else {}
  padded = []
  for name, flat in zip(names, flats):
    full = dict(flat)
    for path in sorted(set(shapes) - set(flat)):
      identity, shape = experts.neutral(tree_paths.join(path)), shapes[path][1]
      if identity is not None:
        full[path] = np.full(shape, identity, np.float32)
      elif path in given and np.shape(given[path]) == shape:
        full[path] = np.asarray(given[path], np.float32)
      else:
        raise ExpertStackError(
            f"experts {name!r} and {shapes[path][0]!r} have different configurations, and only the "
            f"second trains {tree_paths.join(path)!r}: stacked together, the first needs the pretrained "
            "backbone's value there. Experts of several kinds are scored together when loaded with their "
            "backbone (library.loaded.load_experts); merged, only with experts of their own configuration")
    padded.append(full)
  return stack_trees([tree_paths.unflatten(f) for f in padded], names), experts


def index(params: Any, i: int) -> Any:
  """Expert `i`'s own tree (the one conversion from the stacked form to a single expert)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], params)


def take(params: Any, rows: Sequence[int]) -> Any:
  """The experts at `rows`, still stacked: leaves [len(rows), ...]."""
  rows = np.asarray(rows, np.int64)
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], params)


def chunks(params: Any, size: int) -> Iterator[tuple[int, int, Any]]:
  """(start, stop, chunk) over the leading axis: chunk leaves are [size, ...] host arrays, the
  last chunk padded by repeating the last expert so every chunk has one shape."""
  total = num_experts(params)
  for start in range(0, total, size):
    yield start, min(start + size, total), take(params, np.minimum(np.arange(start, start + size), total - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertStack:
  """Named experts of one `expert_config` (or, for experts of several kinds, an `ExpertSet` of
  one config per kind), their parameters stacked: `params` leaves are [len(names), ...] in the
  order of `names`."""
  names: tuple[str, ...]
  params: Any
  expert_config: ExpertConfig | ExpertSet

  def __post_init__(self):
    object.__setattr__(self, "names", tuple(self.names))
    if len(set(self.names)) != len(self.names):
      raise ExpertStackError(f"expert names repeat: {list(self.names)}")
    if self.names and num_experts(self.params) != len(self.names):
      raise ExpertStackError(f"{len(self.names)} names for a stack of {num_experts(self.params)} experts")

  @classmethod
  def from_trees(cls, names: Sequence[str], trees: Sequence[Mapping],
                 expert_config: ExpertConfig) -> "ExpertStack":
    return cls(tuple(names), stack_trees(trees, names), expert_config)

  @classmethod
  def load(cls, names: Sequence[str], directories: Sequence[str], *,
           recorded: Optional[Sequence[Optional[Mapping]]] = None, backbone_fingerprint: Optional[str] = None,
           check_integrity: bool = True, pretrained: Optional[Mapping] = None
           ) -> tuple["ExpertStack", list[expert_files.ExpertMetadata]]:
    """Reads each expert directory once (checked against `recorded` digests, a library
    manifest's, when given) and stacks them once. Experts of several configurations (one per
    kind) are stacked as `stack_mixed` does, with `pretrained` (the full backbone tree) for the
    backbone parameters only some of them train."""
    trees, metas = [], []
    for i, (name, directory) in enumerate(zip(names, directories)):
      tree, meta = expert_files.load_expert(directory, backbone_fingerprint,
                                            recorded=recorded[i] if recorded else None,
                                            what=f"expert {name!r}", check_integrity=check_integrity)
      trees.append(tree)
      metas.append(meta)
    if not trees:
      raise ExpertStackError("no experts selected")
    configs = [ExpertConfig(**meta.expert_config) for meta in metas]
    if len({config.settings() for config in configs}) == 1:  # one configuration (fields it reads)
      return cls.from_trees(names, trees, configs[0]), metas
    params, experts = stack_mixed(trees, configs, names, pretrained)
    return cls(tuple(names), params, experts), metas

  def __len__(self) -> int:
    return len(self.names)

  def position(self, name: str) -> int:
    if name not in self.names:
      raise ExpertStackError(f"no expert named {name!r} in this stack ({', '.join(self.names[:10])})")
    return self.names.index(name)

  def tree(self, name: str) -> Any:
    """One expert's parameter tree."""
    return index(self.params, self.position(name))

  def select(self, names: Sequence[str]) -> "ExpertStack":
    """The named experts, in that order, as a stack (one gather per leaf)."""
    return ExpertStack(tuple(names), take(self.params, [self.position(n) for n in names]), self.expert_config)

  def renamed(self, names: Sequence[str]) -> "ExpertStack":
    return ExpertStack(tuple(names), self.params, self.expert_config)


# ---------------------------------------------------------------------------- sharding
def leading_axis_specs(tree: Any) -> Any:
  """Specs placing only the leading expert axis of every [E, ...] leaf (scalars replicated):
  for optimizer state, whose structure depends on the optimizer."""
  return jax.tree_util.tree_map(
      lambda x: PartitionSpec("expert", *([None] * (x.ndim - 1))) if x.ndim else PartitionSpec(), tree)


def place(params: Any, partitioner=None, specs: Any = None) -> Any:
  """A stacked tree (or a chunk of one) on the device(s): split over the mesh by `specs` with a
  partitioner, else on the default device."""
  if partitioner is None:
    return jax.device_put(params)
  return partitioner.place(params, specs)


# ---------------------------------------------------------------------------- on a backbone
@dataclasses.dataclass(frozen=True, eq=False)
class ExpertsOnBackbone:
  """An expert stack with what it runs on: the model, the frozen backbone (the part of the
  pretrained tree the experts do not replace) and the vocabulary file; `source_lengths`, each
  expert's training input length by name (evaluation cuts that expert's inputs there), where
  known."""
  model: EncoderDecoderModel
  backbone: Any
  stack: ExpertStack
  vocab_path: Optional[str] = None
  source_lengths: Optional[Mapping[str, Optional[int]]] = None

  @property
  def names(self) -> tuple[str, ...]:
    return self.stack.names

  @property
  def config(self) -> T5Config:
    return self.model.config

  def vocabulary(self) -> SentencePieceVocabulary:
    if self.vocab_path is None:
      raise UserInputError("the backbone checkpoint has no spiece.model; pass --vocabulary=PATH")
    return SentencePieceVocabulary(self.vocab_path)

  def with_stack(self, stack: ExpertStack) -> "ExpertsOnBackbone":
    """The same backbone with other experts (of the same configuration)."""
    return dataclasses.replace(self, stack=stack)

  def input_length_groups(self, max_input_length: int) -> list[tuple[int, list[int]]]:
    """(input length, positions in the stack) of the experts that read inputs cut at that
    length: each expert's own training source length, at most `max_input_length` (experts of
    unknown length take `max_input_length`); shortest first."""
    groups: dict[int, list[int]] = {}
    for i, name in enumerate(self.names):
      own = (self.source_lengths or {}).get(name)
      groups.setdefault(min(max_input_length, own) if own else max_input_length, []).append(i)
    return sorted(groups.items())
