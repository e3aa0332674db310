"""Where an evaluating command puts its experts: the mesh and the expert chunk of `eval`,
`score --library` and `retrieve --method=likelihood|oracle`.

The mesh is the one `train` uses (`partitioning.MeshConfig` over the `data`, `expert` and
`model` axes): experts split over `expert`, batch rows over `data`, the backbone over `model`
(t5x's 1-D model rules), across every device of every process (a mesh of fewer devices than
one process has runs on the first of them; `--mesh=data:1` is one device). It comes from `--mesh=
data:2,expert:4`, else from gin bindings of `partitioning.MeshConfig` (or the `MESH_CONFIG`
macro of `runs/eval.gin`; `commands/run_files.py` reads them), else from the devices: one device runs without a mesh; several put
every device on `expert` when the experts fill them, and the devices experts cannot fill on
`data` (`auto_mesh`).

The expert chunk (experts scored per device pass) is `--expert_chunk` when given; else it
follows from each device's memory (`experts_per_device`): the backbone's share of a device,
then as many experts (parameters plus one batch's activations, `scoring_bytes_per_expert`) as
fit in EXPERT_MEMORY_SHARE of the rest; on CPU, which reports no memory limit, CPU_EXPERT_CHUNK
experts a device (`rank_scoring.default_expert_chunk`). `elm-jax plan` prints the compiled
scorer's own figure for a chosen chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from elm_jax import partitioning
from elm_jax.errors import UserInputError
from elm_jax.evaluation import rank_scoring
from elm_jax.models.t5_config import T5Config

# The share of a device's memory (after the backbone) that experts and activations may fill;
# the rest is XLA's working space and fragmentation.
EXPERT_MEMORY_SHARE = 0.8


class PlacementError(UserInputError):
  """A mesh that the devices or the experts cannot take."""


@dataclasses.dataclass(frozen=True)
class Placement:
  """The mesh an evaluating command runs on (None: one device, no mesh), the experts per device
  pass, and one line saying which layout was chosen and why."""
  partitioner: Optional[partitioning.Partitioner]
  expert_chunk: int
  description: str

  @property
  def mesh_shape(self) -> dict[str, int]:
    if self.partitioner is None:
      return {"data": 1, "expert": 1, "model": 1}
    return dict(self.partitioner.mesh.shape)


def parse_mesh_flag(text: Optional[str]) -> Optional[partitioning.MeshConfig]:
  """`--mesh=data:2,expert:4[,model:1]` -> MeshConfig (axes not named are 1; one may be -1)."""
  if text is None:
    return None
  sizes: dict[str, int] = {}
  for part in text.split(","):
    axis, sep, size = part.strip().partition(":")
    if not sep or axis not in partitioning.MESH_AXES:
      raise PlacementError(f"--mesh={text}: expected AXIS:SIZE pairs separated by commas, with AXIS one "
                           f"of {', '.join(partitioning.MESH_AXES)} (e.g. --mesh=data:2,expert:4)")
    if axis in sizes:
      raise PlacementError(f"--mesh={text}: axis {axis!r} is given twice")
    try:
      sizes[axis] = int(size)
    except ValueError:
      raise PlacementError(f"--mesh={text}: {axis}: expected an integer size (or -1), got {size!r}") from None
    if sizes[axis] == 0 or sizes[axis] < -1:
      raise PlacementError(f"--mesh={text}: {axis}: expected a positive size or -1, got {sizes[axis]}")
  return partitioning.MeshConfig(**{axis: sizes.get(axis, 1) for axis in partitioning.MESH_AXES})


def auto_mesh(num_experts: int, batch_size: int, num_devices: int) -> partitioning.MeshConfig:
  """Every device on `expert` when there are at least as many experts as devices; else the
  largest `expert` axis the experts fill whose `data` axis (the other devices) splits the batch
  rows evenly (all devices on `expert`, some holding repeated experts, when none does)."""
  if num_experts >= num_devices:
    return partitioning.MeshConfig(data=1, expert=num_devices, model=1)
  for expert in sorted((d for d in range(1, num_devices + 1) if num_devices % d == 0), reverse=True):
    if expert <= num_experts and batch_size % (num_devices // expert) == 0:
      return partitioning.MeshConfig(data=num_devices // expert, expert=expert, model=1)
  return partitioning.MeshConfig(data=1, expert=num_devices, model=1)


def scoring_bytes_per_expert(model_config: T5Config, expert_params: Any, *, batch_size: int,
                             input_length: int, target_length: int, choices: int = 4,
                             data_ways: int = 1) -> int:
  """An estimate of one expert's share of a device in the one-pass scorer: its parameters
  (float32) plus the largest activations alive at once in a forward pass with no backward
  (one layer's residual stream, feed-forward activations and attention logits, in the encoder
  and in the decoder, and the output logits of every choice token), doubled for XLA's working
  copies, for one batch split over the `data` axis. On the XL scorer (batch 32, 4 choices,
  512/128 tokens, one adapter expert) it comes to 13.0 GiB against the 14.4 GiB of temporaries XLA
  compiles for it (`elm-jax plan`)."""
  params = sum(int(np.prod(np.shape(x)[1:])) * 4 for x in jax.tree_util.tree_leaves(expert_params))
  width = model_config.emb_dim * 4 + model_config.mlp_dim * 2
  heads = model_config.num_heads
  rows = batch_size / max(data_ways, 1)
  encoder = rows * input_length * (width + heads * input_length)
  decoder = rows * choices * target_length * (width + heads * (target_length + input_length))
  logits = rows * choices * target_length * (model_config.softmax_vocab_size or model_config.vocab_size)
  return int(params + 2 * 4 * (encoder + decoder + logits))


def device_memory_bytes(device: jax.Device) -> Optional[int]:
  """A device's memory limit, or None where the backend reports none (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics raise one of several errors
    return None
  return (stats or {}).get("bytes_limit")


def experts_per_device(memory: Optional[int], backbone_bytes: int, per_expert: int, model_ways: int) -> int:
  """How many experts one device scores per pass: CPU_EXPERT_CHUNK without a memory limit;
  else those that fit in EXPERT_MEMORY_SHARE of what the backbone's share leaves (at least 1)."""
  if memory is None:
    return rank_scoring.CPU_EXPERT_CHUNK
  free = EXPERT_MEMORY_SHARE * (memory - backbone_bytes / model_ways)
  return max(1, int(free // max(per_expert, 1)))


def decide(num_experts: int, num_devices: int, *, batch_size: int, memory: Optional[int], backbone_bytes: int,
           per_expert: int, mesh_config: Optional[partitioning.MeshConfig] = None,
           expert_chunk: Optional[int] = None, batch_flag: str = "--batch_size",
           chunk_flag: str = "--expert_chunk") -> tuple[partitioning.MeshConfig, int, str]:
  """(mesh, experts per pass, the words saying why) on `num_devices` devices of `memory` bytes
  (None: not reported): `mesh_config`, else `auto_mesh`; `expert_chunk` rounded up to the
  `expert` axis, else `experts_per_device` a device; at most the experts, padded to the axis.
  What `choose` decides for the devices at hand and `elm-jax plan` for a pod it simulates."""
  chosen_by = "as given"
  if mesh_config is None:
    mesh_config, chosen_by = auto_mesh(num_experts, batch_size, num_devices), "chosen for the experts"
  data, expert, model = mesh_config.resolve(num_devices)
  if batch_size % data:
    raise PlacementError(f"{batch_flag}={batch_size}: the mesh's data axis ({data}) must divide the "
                         f"batch rows; pass a batch size that is a multiple of {data} or another mesh")
  if expert_chunk is not None:
    chunk, why = -(-expert_chunk // expert) * expert, chunk_flag
  else:
    per_device = experts_per_device(memory, backbone_bytes, per_expert, model)
    chunk = per_device * expert
    why = ("CPU default" if memory is None else f"{per_device} a device fit in {memory / 2**30:.1f} GiB")
  chunk = min(chunk, -(-num_experts // expert) * expert)
  return (mesh_config, chunk,
          f"{data} data x {expert} expert x {model} model ({chosen_by}); {chunk} experts per pass ({why})")


def choose(num_experts: int, model_config: T5Config, backbone: Any, expert_params: Any, *,
           batch_size: int, max_input_length: int, max_target_length: int,
           mesh_config: Optional[partitioning.MeshConfig] = None, expert_chunk: Optional[int] = None,
           devices: Optional[Sequence[jax.Device]] = None, what: str = "eval") -> Placement:
  """The placement for scoring `num_experts` experts (leaves of `expert_params` [E, ...]) on
  `backbone`: `mesh_config` when given, else `auto_mesh` over every device of every process
  (one device: no mesh); the chunk as the module docstring says."""
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config is not None and -1 not in (mesh_config.data, mesh_config.expert, mesh_config.model):
    wanted = mesh_config.data * mesh_config.expert * mesh_config.model
    if wanted < len(devices) and jax.process_count() == 1:  # a smaller mesh: the first devices
      devices = devices[:wanted]
      if wanted == 1:
        mesh_config = None
  if mesh_config is None and len(devices) == 1:
    chunk = min(expert_chunk or rank_scoring.default_expert_chunk(num_experts), num_experts)
    return Placement(None, chunk, f"{what}: 1 {devices[0].platform} device; {chunk} expert(s) per pass")
  backbone_bytes = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                       for x in jax.tree_util.tree_leaves(backbone))
  data = 1 if mesh_config is None else mesh_config.resolve(len(devices))[0]
  per_expert = scoring_bytes_per_expert(model_config, expert_params, batch_size=batch_size,
                                        input_length=max_input_length, target_length=max_target_length,
                                        data_ways=data)
  mesh_config, chunk, words = decide(
      num_experts, len(devices), batch_size=batch_size,
      memory=device_memory_bytes(jax.local_devices()[0]),  # devices[0] may be another process's
      backbone_bytes=backbone_bytes, per_expert=per_expert, mesh_config=mesh_config, expert_chunk=expert_chunk)
  description = (f"{what}: {len(devices)} {devices[0].platform} devices in {jax.process_count()} "
                 f"process(es) as {words}")
  return Placement(partitioning.Partitioner(mesh_config, devices=devices), chunk, description)


def is_split_over_experts(placed: Any, ways: int) -> bool:
  """Whether every leaf of a placed [E, ...] stack holds E / `ways` experts per device."""
  for leaf in jax.tree_util.tree_leaves(placed):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    if shard_shape[0] * ways != leaf.shape[0]:
      return False
  return True
