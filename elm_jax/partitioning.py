"""Mesh construction and logical-axis partitioning (the modern form of t5x's pjit partitioner).

The model names every parameter and key activation with logical axes (`batch`, `embed`, `mlp`,
`heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`, `expert`, ...). One table of rules maps
them to the mesh axes (`data`, `expert`, `model`); `Partitioner.partition` jits a function with
the resulting `NamedSharding`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import sys
import threading
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
                           heartbeat_timeout_seconds: int = 60,
                           initialization_timeout_seconds: int = 300, program: str = "elm-jax") -> None:
  """Starts JAX's multi-process runtime: with `num_processes` > 1 on the coordinator given
  (every process runs the same command with its own `process_id`), or with `auto` where JAX
  detects the cluster itself (TPU pods, SLURM, ...). A no-op for one process. Flags that do not
  go together (a process id or coordinator without a process count, `auto` with either) are
  refused. A process that stops sending heartbeats for `heartbeat_timeout_seconds` makes every
  other process stop with "The following tasks are unhealthy (stopped sending heartbeats): <its
  id>".

  When the coordinator and every process have not joined within
  `initialization_timeout_seconds`, the process prints one line, `<program>: error: ...`, saying
  which, and exits with status 2: XLA's own deadline would end it with a fatal abort instead
  (its client aborts the process rather than raise), so JAX is given a later one."""
  check_distributed_flags(coordinator_address, num_processes, process_id, auto=auto)
  if not auto and num_processes in (None, 1):
    return
  timeouts = dict(initialization_timeout=initialization_timeout_seconds + _JAX_GRACE_SECONDS,
                  heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  flag = "--distributed_auto" if auto else f"--coordinator_address={coordinator_address}"
  late = functools.partial(_not_joined, coordinator_address, num_processes, process_id,
                           initialization_timeout_seconds)
  with _deadline(initialization_timeout_seconds, program, late):
    try:
      if auto:
        jax.distributed.initialize(**timeouts)
      else:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    except (ValueError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if auto and ("should be defined" in reason or "must be defined" in reason):
        raise PartitioningError(
            f"--distributed_auto: JAX found no cluster to join ({reason}); on one machine leave the "
            "multi-process flags out, elsewhere give --coordinator_address, --num_processes and "
            "--process_id together") from None
      raise PartitioningError(f"{flag}: JAX's multi-process runtime did not start ({reason})") from None


# How much later than ours JAX's own initialization deadline is (see `initialize_distributed`).
_JAX_GRACE_SECONDS = 30
_TOGETHER = ("the multi-process flags go together: --coordinator_address=HOST:PORT --num_processes=N "
             "--process_id=0..N-1 (or --distributed_auto alone)")


def check_distributed_flags(coordinator_address: Optional[str], num_processes: Optional[int],
                            process_id: Optional[int], *, auto: bool = False) -> None:
  """Refuses multi-process flags that do not make sense together, naming them."""
  if auto:
    if coordinator_address is not None or num_processes is not None or process_id is not None:
      raise PartitioningError("--distributed_auto: give it alone (JAX detects the coordinator, the number "
                              "of processes and this process's id), or leave it out and give "
                              "--coordinator_address, --num_processes and --process_id together")
    return
  if num_processes is None:
    for flag, value in (("--process_id", process_id), ("--coordinator_address", coordinator_address)):
      if value is not None:
        raise PartitioningError(f"{flag}={value}: given without --num_processes; {_TOGETHER}")
    return
  if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
    raise PartitioningError(f"--num_processes: expected a positive integer, got {num_processes!r}")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise PartitioningError(f"--process_id={process_id}: expected 0 .. {num_processes - 1} "
                            f"(--num_processes={num_processes})")
  if num_processes > 1 and (coordinator_address is None or process_id is None):
    raise PartitioningError(f"--num_processes={num_processes}: needs --coordinator_address=HOST:PORT (process "
                            f"0's) and --process_id=0..{num_processes - 1}; {_TOGETHER}")
  if coordinator_address is not None:
    _host, sep, port = coordinator_address.rpartition(":")
    if not sep or not _host or not port.isdigit() or not 0 < int(port) < 65536:
      raise PartitioningError(f"--coordinator_address={coordinator_address}: expected HOST:PORT "
                              "(process 0's host and a free port, e.g. 10.0.0.2:8476)")


@contextlib.contextmanager
def _deadline(seconds: float, program: str, message: Callable[[], str]):
  """Ends the process with `<program>: error: <message()>` and status 2 unless the body is done
  within `seconds` (it may be blocked in C++, where no Python exception can reach it)."""
  def give_up():
    text = f"no answer within {seconds:g} s"
    try:
      text = message()
    finally:
      sys.stdout.flush()
      sys.stderr.write(f"{program}: error: {text}\n")
      sys.stderr.flush()
      os._exit(2)
  timer = threading.Timer(seconds, give_up)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def _not_joined(coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int],
                seconds: int) -> str:
  """Why the processes have not all joined after `seconds`, in the flags' terms."""
  within = f"within {seconds} s (--initialization_timeout)"
  if coordinator_address is None:
    return f"--distributed_auto: the processes JAX detected did not all join {within}"
  flag = f"--coordinator_address={coordinator_address}"
  if process_id == 0:
    return (f"{flag}: process 0 of {num_processes}: the other processes did not all join {within}; start "
            f"processes 1..{num_processes - 1} with --coordinator_address={coordinator_address}")
  host, _, port = coordinator_address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
  except OSError:
    return (f"{flag}: no process answers at {coordinator_address} {within}; start process 0 there "
            "(--process_id=0), or check the host and port")
  return (f"{flag}: process 0 answers, but not all {num_processes} processes joined {within}; start every "
          "one with the same --coordinator_address and --num_processes")


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
