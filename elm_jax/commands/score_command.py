"""`elm-jax score`: rank classification of JSONL examples with any T5 checkpoint.

Input lines: {"id": ..., "inputs": "text", "choices": ["a", "b", ...]}, each read into the
instance shape of `tasks/instances.py` ({"id", "inputs", "answer_choices"}) and scored as
[E, N, C] log-likelihoods (`instance_scores`: E = 1 for a --checkpoint, the selected experts, in
one vmapped pass, for a --library). Output lines: {"id": ..., "scores": [...], "prediction":
index}; with --library, {"id": ..., "scores": {expert: [...]}, "prediction": {expert: index}}.
Nothing is written to --output until every example has been scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any, Optional

import numpy as np

from elm_jax import defaults, files, jsonl, partitioning
from elm_jax.checkpoints import loading
from elm_jax.commands import flags, gin_utils, run_files
from elm_jax.errors import UserInputError
from elm_jax.evaluation import rank_scoring
from elm_jax.evaluation.expert_eval import rank_examples, score_instances
from elm_jax.library.loaded import load_experts
from elm_jax.vocabularies import SentencePieceVocabulary


REQUIRED = ("input", "output")  # flags a run file may bind instead (runs/score.gin)


class InputError(UserInputError):
  """A malformed input file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  flags.add_distributed_flags(parser)
  parser.add_argument("--checkpoint", default=None,
                      help="Hugging Face T5/mT5 directory (config.json, *.safetensors, spiece.model), "
                           "or a T5X checkpoint (legacy or Orbax; needs a model --gin_file); with "
                           "--library, the backbone (default: the one the library records)")
  parser.add_argument("--library", default=None, help="Expert Library: score with its experts")
  parser.add_argument("--experts", default="all", help="with --library: all or NAME,NAME,...")
  parser.add_argument("--expert_chunk", type=flags.positive_int, default=None,
                      help="with --library: experts per device pass (bounds memory)")
  parser.add_argument("--mesh", default=None,
                      help="with --library: data:D,expert:E,model:M (default: every device, experts on `expert`)")
  parser.add_argument("--input", default=None, help="JSONL file of {id, inputs, choices}")
  parser.add_argument("--output", default=None, help="JSONL file to write {id, scores, prediction}")
  parser.add_argument("--batch_size", type=flags.positive_int, default=defaults.BATCH_SIZE)
  parser.add_argument("--length_normalize", action="store_true",
                      help="divide each choice's score by its token count (EOS included)")
  parser.add_argument("--max_input_length", type=flags.token_length, default=defaults.MAX_INPUT_LENGTH)
  parser.add_argument("--max_target_length", type=flags.token_length, default=defaults.MAX_TARGET_LENGTH)
  parser.add_argument("--vocabulary", default=None,
                      help="SentencePiece model (default: spiece.model in the checkpoint directory)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="activation dtype (parameters stay float32)")
  parser.add_argument("--softmax_vocab_size", type=flags.positive_int, default=None,
                      help="log-softmax over the first N logits only (the paper: 32100, its tokenizer's "
                           "size); with --library the default is what the experts were trained with")
  flags.add_integrity_flag(parser)


def read_instances(path: str) -> list[dict[str, Any]]:
  """The JSONL input's examples as instances {"id", "inputs", "answer_choices"}, each checked;
  errors name the file, the line and the field."""
  instances = [check_example(record, f"{path}:{number}")
               for number, record in jsonl.read_objects(path, "--input")]
  if not instances:
    raise InputError(f"{path}: no examples (the file is empty)")
  return instances


def check_example(record: Any, where: str) -> dict[str, Any]:
  """The instance {"id", "inputs", "answer_choices"} of `record` when it is an example {"id":
  string or number, "inputs": string, "choices": [string, ...]}; else an InputError naming
  `where` and the field."""
  if not isinstance(record, dict):
    raise InputError(f"{where}: expected an object {{id, inputs, choices}}, got {type(record).__name__}")
  if "id" not in record:
    raise InputError(f"{where}: field 'id' is missing")
  if not isinstance(record["id"], (str, int, float)) or isinstance(record["id"], bool) or (
      isinstance(record["id"], float) and not math.isfinite(record["id"])):
    raise InputError(f"{where}: field 'id' must be a string or a number, got {record['id']!r}")
  if not isinstance(record.get("inputs"), str):
    raise InputError(f"{where}: field 'inputs' must be a string, got "
                     f"{type(record.get('inputs')).__name__}")
  choices = record.get("choices")
  if not isinstance(choices, list) or not choices:
    raise InputError(f"{where}: field 'choices' must be a non-empty list of strings")
  for j, choice in enumerate(choices):
    if not isinstance(choice, str):
      raise InputError(f"{where}: field 'choices[{j}]' must be a string, got {type(choice).__name__}")
  return {"id": record["id"], "inputs": record["inputs"], "answer_choices": choices}


@dataclasses.dataclass(frozen=True)
class InstanceScores:
  """Log-likelihoods of N instances' choices: `scores` [E, N, C] float32 (-inf on padded
  choices), `counts` [N, C] int32 (tokens, EOS included; 0 on padding); `experts`: the E
  experts' names, or None for one checkpoint (E = 1); `compiled_shapes`: the programs a
  checkpoint's scorer compiled (None with experts)."""
  experts: Optional[tuple[str, ...]]
  scores: np.ndarray
  counts: np.ndarray
  compiled_shapes: Optional[int] = None


def instance_scores(args: argparse.Namespace, instances: list[dict[str, Any]]) -> InstanceScores:
  """The scores of `instances` by the --library's selected experts, else by the --checkpoint."""
  if args.library:
    loaded = load_experts(args.library, args.experts, checkpoint=args.checkpoint, dtype=args.dtype,
                          vocabulary=args.vocabulary, check_integrity=not args.skip_integrity_check,
                          config=gin_utils.model_config_or_none(), softmax_vocab_size=args.softmax_vocab_size)
    scores, counts = library_scores(loaded, instances, batch_size=args.batch_size,
                                    expert_chunk=args.expert_chunk, mesh_config=run_files.mesh_config(args.mesh),
                                    max_input_length=args.max_input_length,
                                    max_target_length=args.max_target_length,
                                    softmax_vocab_size=args.softmax_vocab_size, source=args.input)
    return InstanceScores(tuple(loaded.names), scores, counts)
  if not args.checkpoint:
    raise InputError("pass --checkpoint=DIR (a T5 checkpoint) or --library=DIR (an Expert Library)")
  checkpoint = loading.load_model_checkpoint(args.checkpoint, config=gin_utils.model_config_or_none(),
                                             dtype=args.dtype, softmax_vocab_size=args.softmax_vocab_size)
  vocab_path = args.vocabulary or checkpoint.vocab_path
  if vocab_path is None:
    raise InputError(f"{args.checkpoint}: no spiece.model in the checkpoint directory; "
                     "pass --vocabulary=PATH")
  vocabulary = SentencePieceVocabulary(vocab_path)
  flags.check_softmax_cut(args.softmax_vocab_size, vocabulary, _choices(args.input, instances),
                          eos_id=checkpoint.config.eos_id, pad_id=checkpoint.config.pad_id)
  scorer = rank_scoring.RankScorer(checkpoint.model, checkpoint.params, batch_size=args.batch_size,
                                   max_input_length=args.max_input_length,
                                   max_target_length=args.max_target_length)
  scores, counts = rank_scoring.padded_scores(scorer, rank_examples(vocabulary, instances, args.input))
  scorer.truncated.report(args.max_input_length, args.max_target_length)
  return InstanceScores(None, scores, counts, len(scorer.shapes_compiled))


def output_records(instances: list[dict[str, Any]], scored: InstanceScores, *,
                   length_normalize: bool = False) -> list[dict[str, Any]]:
  """One output record per instance, in order: {"id", "scores": [...], "prediction": index}
  for a checkpoint, {"id", "scores": {expert: [...]}, "prediction": {expert: index}} for
  experts; `length_normalize` divides each choice's score by its token count."""
  out = []
  for n, instance in enumerate(instances):
    num = len(instance["answer_choices"])
    values = scored.scores[:, n, :num]                                     # [E, num]
    values = values / scored.counts[n, :num] if length_normalize else values
    if scored.experts is None:
      out.append({"id": instance["id"], "scores": [float(v) for v in values[0]],
                  "prediction": int(values[0].argmax())})
    else:
      out.append({"id": instance["id"],
                  "scores": {name: [float(v) for v in values[e]] for e, name in enumerate(scored.experts)},
                  "prediction": {name: int(values[e].argmax()) for e, name in enumerate(scored.experts)}})
  return out


def _choices(path: str, instances):
  """(where, text) of every answer choice of `instances`, for `flags.check_softmax_cut`."""
  return ((f"{path}, id {r['id']!r}", choice) for r in instances for choice in r["answer_choices"])


def library_scores(loaded, instances, *, batch_size: int, expert_chunk: Optional[int],
                   mesh_config: Optional[partitioning.MeshConfig], max_input_length: int, max_target_length: int,
                   softmax_vocab_size: Optional[int], source: str):
  """Every loaded expert's log-likelihood of every checked instance's choices, in one pass:
  (scores [E, N, C] with -inf on padded choices, token counts [N, C], EOS included), on the mesh
  and expert chunk `run_files.choose_placement` picks; what `score --library` and
  `elm_jax.api.score` compute."""
  flags.check_softmax_cut(softmax_vocab_size, loaded.vocabulary(), _choices(source, instances),
                          eos_id=loaded.config.eos_id, pad_id=loaded.config.pad_id)
  chosen = run_files.choose_placement(loaded, "score", batch_size=batch_size, expert_chunk=expert_chunk,
                                      mesh_config=mesh_config, max_input_length=max_input_length,
                                      max_target_length=max_target_length)
  return score_instances(loaded, instances, batch_size=batch_size, partitioner=chosen.partitioner,
                         expert_chunk=chosen.expert_chunk, max_input_length=max_input_length,
                         max_target_length=max_target_length, source=source)


def main(args: argparse.Namespace) -> int:
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  run_files.fill_from_gin(args, run_files.parser_defaults(parser), required=REQUIRED)
  files.check_output_file(args.output, "--output", inputs=[args.input, args.vocabulary],
                          within=files.directories_read(args.library, args.checkpoint))
  instances = read_instances(args.input)
  start = time.perf_counter()
  scored = instance_scores(args, instances)
  elapsed = time.perf_counter() - start
  out = output_records(instances, scored, length_normalize=args.length_normalize)
  if partitioning.is_primary():
    jsonl.write_objects(args.output, out)
  partitioning.barrier("elm_jax.score.output")
  experts = f" with {len(scored.experts)} experts" if scored.experts is not None else ""
  shapes = f" ({scored.compiled_shapes} compiled shapes)" if scored.compiled_shapes is not None else ""
  print(f"scored {len(out)} examples{experts} in {elapsed:.1f}s{shapes} -> {args.output}", file=sys.stderr)
  return 0
