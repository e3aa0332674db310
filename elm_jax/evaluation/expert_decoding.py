"""Decoding by every expert at once: each expert's generated text for every input.

`decode_all_experts` is `EncoderDecoderModel.expert_predictions` compiled (greedy or beam
decoding, experts' leaves [E, ...]); `decode_texts` runs it over text inputs in padded batches
and chunks of experts, and decodes the tokens back to text. Generation tasks are evaluated on
these texts (`expert_eval`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import jax

from elm_jax import batching, defaults, expert_stack, partitioning
from elm_jax.evaluation import rank_scoring
from elm_jax.expert_stack import ExpertsOnBackbone
from elm_jax.models.model import EncoderDecoderModel

Array = jax.Array
# Generation pads inputs to powers of two, at least 64 tokens: each shape compiles a decoding
# loop (far costlier than a scoring program), so its buckets stay coarse.
GENERATION_MIN_INPUT_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "beam_size"))
def decode_all_experts(model: EncoderDecoderModel, backbone, experts, encoder_tokens: Array, *,
                       max_decode_length: int, beam_size: int = 1) -> tuple[Array, Array]:
  """`EncoderDecoderModel.expert_predictions`, compiled: greedy (beam_size 1) or beam decoding
  by every expert at once, experts' leaves [E, ...], encoder_tokens [N, Li] -> (tokens [E, N,
  max_decode_length], scores [E, N])."""
  return model.expert_predictions(backbone, experts, encoder_tokens, max_decode_length=max_decode_length,
                                  beam_size=beam_size)


def decode_texts(loaded: ExpertsOnBackbone, inputs: Sequence[str], *, batch_size: int = defaults.BATCH_SIZE,
                 expert_chunk: Optional[int] = None, max_input_length: int = defaults.MAX_INPUT_LENGTH,
                 max_decode_length: int = defaults.MAX_TARGET_LENGTH, beam_size: int = 1,
                 partitioner=None) -> list[list[str]]:
  """Every expert's decoded text for every input: [E][N] strings; each expert reads inputs cut
  at its own training source length (at most `max_input_length`, EOS kept). With a
  `partitioner`, each chunk of experts is split over the mesh's `expert` axis (the chunk rounded
  up to a multiple of it), batch rows over `data` and the backbone by the model rules."""
  out: list[list[str]] = [[] for _ in loaded.names]
  groups = loaded.input_length_groups(max_input_length)
  for length, positions in groups:
    group = loaded if len(groups) == 1 else loaded.with_stack(
        loaded.stack.select([loaded.names[i] for i in positions]))
    texts = _decode_group(group, inputs, batch_size=batch_size, expert_chunk=expert_chunk,
                          max_input_length=length, max_decode_length=max_decode_length,
                          beam_size=beam_size, partitioner=partitioner)
    for i, text in zip(positions, texts):
      out[i] = text
  return out


def _decode_group(loaded: ExpertsOnBackbone, inputs: Sequence[str], *, batch_size: int,
                  expert_chunk: Optional[int], max_input_length: int, max_decode_length: int,
                  beam_size: int, partitioner) -> list[list[str]]:
  """`decode_texts` for experts that share one input length: [E][N] strings."""
  vocabulary = loaded.vocabulary()
  eos, pad = loaded.config.eos_id, loaded.config.pad_id
  ids = [vocabulary.encode(t)[:max_input_length - 1] + [eos] for t in inputs]
  num_experts = len(loaded.names)
  chunk = min(expert_chunk or rank_scoring.default_expert_chunk(num_experts), num_experts)
  backbone, expert_specs = loaded.backbone, None
  if partitioner is not None:
    ways = partitioner.mesh.shape["expert"]
    chunk = -(-chunk // ways) * ways
    backbone_specs, expert_specs = loaded.model.expert_specs()
    backbone = partitioner.place(backbone, backbone_specs)
  out: list[list[str]] = [[""] * len(inputs) for _ in range(num_experts)]
  batches = list(batching.padded_batches(ids, batch_size, GENERATION_MIN_INPUT_BUCKET, max_input_length))
  for start_e, stop_e, experts in expert_stack.chunks(loaded.stack.params, chunk):
    experts = expert_stack.place(experts, partitioner, expert_specs)  # once per chunk, not per batch
    with partitioner.context() if partitioner is not None else contextlib.nullcontext():
      decoded = [decode_all_experts(loaded.model, backbone, experts, tokens,
                                    max_decode_length=max_decode_length, beam_size=beam_size)[0]
                 for _, tokens in batches]
    for (rows, _), tokens_out in zip(batches, decoded):
      tokens_out = partitioning.to_host(tokens_out)
      for e in range(stop_e - start_e):
        for r, i in enumerate(rows):
          seq = tokens_out[e, r].tolist()
          seq = seq[:seq.index(eos)] if eos in seq else seq
          out[start_e + e][i] = vocabulary.decode([t for t in seq if t != pad])
  return out
