"""Mesh construction and logical-axis partitioning (the modern form of t5x's pjit partitioner).

The model names every parameter and key activation with logical axes (`batch`, `embed`, `mlp`,
`heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`, `expert`, ...). One table of rules maps
them to the mesh axes (`data`, `expert`, `model`); `Partitioner.partition` jits a function with
the resulting `NamedSharding`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from elm_jax.errors import UserInputError

MESH_AXES = ("data", "expert", "model")

# Logical axis -> mesh axis (None: replicated). Data parallel over `data`, experts over `expert`,
# 1-D model parallelism over `model` as in t5x's standard rules.
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("batch", "data"),
    ("expert", "expert"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("bottleneck", None),
    ("choices", None),
    # Mixture-of-Experts layers (models/moe.py): their experts go on `expert` unless a stacked
    # expert axis (above, listed first) has taken it; routed token groups stay on `data`.
    ("moe_expert", "expert"),
    ("moe_group", "data"),
    ("unmodeled", None),
)

# Expert parallelism for one Mixture-of-Experts model, as t5x's MoE partitioner lays it out:
# the batch is split over both `data` and `expert` (the expert axis doubles as data parallelism
# outside the MoE layers); inside them each device holds its experts and the tokens routed to
# them (two all-to-alls per layer). The stacked-expert axis of the trainer is not split.
MOE_RULES: tuple[tuple[str, Optional[object]], ...] = (
    ("batch", ("data", "expert")),
    ("moe_expert", "expert"),
    ("moe_group", "data"),
    ("expert", None),
) + tuple(rule for rule in DEFAULT_RULES
          if rule[0] not in ("batch", "moe_expert", "moe_group", "expert"))


def moe_rules() -> tuple[tuple[str, Optional[object]], ...]:
  """MOE_RULES, for gin: `train.logical_axis_rules = @partitioning.moe_rules()`."""
  return MOE_RULES


class PartitioningError(UserInputError):
  """A mesh or rule the devices or the arrays cannot satisfy."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape. One axis may be -1: it takes whatever devices the others leave."""
  data: int = -1
  expert: int = 1
  model: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.expert, self.model]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
      raise PartitioningError(f"MeshConfig {self}: at most one axis may be -1")
    for name, size in zip(MESH_AXES, sizes):
      if size != -1 and size < 1:
        raise PartitioningError(f"MeshConfig.{name}: expected a positive size or -1, got {size}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
      if num_devices % known:
        raise PartitioningError(
            f"MeshConfig {self}: {num_devices} devices are not divisible by the fixed axes ({known})")
      sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise PartitioningError(
          f"MeshConfig {self}: the mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
          f"devices, but {num_devices} are available")
    return tuple(sizes)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *, auto: bool = False,
                           heartbeat_timeout_seconds: int = 60) -> None:
  """Starts JAX's multi-process runtime: with `num_processes` > 1 on the coordinator given
  (every process runs the same command with its own `process_id`), or with `auto` where JAX
  detects the cluster itself (TPU pods, SLURM, ...). A no-op for one process. A process that
  stops sending heartbeats for `heartbeat_timeout_seconds` makes every other process stop with
  "The following tasks are unhealthy (stopped sending heartbeats): <its id>"."""
  if auto:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return
  if num_processes is None or num_processes <= 1:
    return
  if coordinator_address is None or process_id is None:
    raise PartitioningError("--num_processes > 1 needs --coordinator_address=HOST:PORT and "
                            "--process_id=N (0 .. num_processes - 1)")
  if not 0 <= process_id < num_processes:
    raise PartitioningError(f"--process_id: expected 0 .. {num_processes - 1}, got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def is_primary() -> bool:
  """Whether this process writes the files every process would write the same (expert files,
  manifests, reports): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached `name` (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """A tree of (possibly multi-process) arrays as full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  def host(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(host, tree)


def local_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The block of a global array of `shape` that this process's devices hold under `sharding`
  (the smallest box around their shards; for the meshes built here it is exactly theirs)."""
  index = sharding.addressable_devices_indices_map(shape)
  block = []
  for dim, size in enumerate(shape):
    starts = [(s[dim].start or 0) if dim < len(s) else 0 for s in index.values()]
    stops = [(size if s[dim].stop is None else s[dim].stop) if dim < len(s) else size for s in index.values()]
    block.append(slice(min(starts), max(stops)))
  return tuple(block)


def global_array(sharding: NamedSharding, shape: tuple[int, ...], local: np.ndarray) -> jax.Array:
  """A global array of `shape` from this process's block of it (`local_block`)."""
  block = local_block(sharding, shape)
  return jax.make_array_from_callback(
      shape, sharding, lambda index: local[tuple(slice((i.start or 0) - b.start, (size if i.stop is None else i.stop) - b.start)
                                              for i, b, size in zip(index, block, shape))])


class Partitioner:
  """Builds the (`data`, `expert`, `model`) mesh and places arrays by logical axis names."""

  def __init__(self, mesh_config: MeshConfig = MeshConfig(),
               logical_axis_rules: Sequence[tuple[str, Optional[str]]] = DEFAULT_RULES,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_config.resolve(len(devices))
    self.mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    self.rules = tuple(logical_axis_rules)
    for logical, mesh_axis in self.rules:
      axes = mesh_axis if isinstance(mesh_axis, (tuple, list)) else (mesh_axis,)
      if any(axis is not None and axis not in MESH_AXES for axis in axes):
        raise PartitioningError(
            f"logical_axis_rules: rule ({logical!r}, {mesh_axis!r}) names an unknown mesh axis; "
            f"expected one of {MESH_AXES} or None")

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"]

  def mesh_spec(self, logical_spec: PartitionSpec) -> PartitionSpec:
    """Logical PartitionSpec -> mesh PartitionSpec through the rules table."""
    return nn.logical_to_mesh_axes(tuple(logical_spec), self.rules)

  def sharding(self, logical_spec: Optional[PartitionSpec]) -> NamedSharding:
    if logical_spec is None:
      return NamedSharding(self.mesh, PartitionSpec())
    return NamedSharding(self.mesh, self.mesh_spec(logical_spec))

  def shardings(self, logical_specs: Any) -> Any:
    """A tree of logical PartitionSpecs -> the same tree of NamedShardings."""
    return jax.tree_util.tree_map(
        self.sharding, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)

  @contextlib.contextmanager
  def context(self):
    """Mesh and axis rules for `nn.with_logical_constraint` inside traced functions."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def place(self, tree: Any, logical_specs: Any) -> Any:
    """Puts a tree of arrays on the mesh as its logical specs say, checking divisibility."""
    shardings = self.shardings(logical_specs)

    def put(path, x, sharding):
      for dim, axis in zip(x.shape, sharding.spec):
        axes = axis if isinstance(axis, tuple) else (axis,)
        size = math.prod(self.mesh.shape[a] for a in axes if a is not None)
        if dim % size:
          raise PartitioningError(
              f"parameter {jax.tree_util.keystr(path)} of shape {x.shape} cannot be split as "
              f"{sharding.spec} over mesh {dict(self.mesh.shape)}: {dim} is not divisible by {size}")
      return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, tree, shardings)

  def partition(self, fn: Callable, in_axis_resources: Any, out_axis_resources: Any,
                static_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """jit `fn` with inputs/outputs placed by logical specs; traced under the mesh and rules."""
    jitted = jax.jit(fn, in_shardings=self.shardings(in_axis_resources),
                     out_shardings=self.shardings(out_axis_resources),
                     static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums))

    def call(*args, **kwargs):
      with self.context():
        return jitted(*args, **kwargs)

    call.lower = lambda *a, **k: _lower_in(self, jitted, *a, **k)
    return call


def _lower_in(partitioner: Partitioner, jitted, *args, **kwargs):
  with partitioner.context():
    return jitted.lower(*args, **kwargs)
