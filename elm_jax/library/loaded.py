"""A library's experts on their backbone, ready to score: what `score`, `eval`, `retrieve` and
`merge` share."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from elm_jax.errors import UserInputError
from elm_jax.library import expert_files
from elm_jax.library.store import ExpertLibrary, LibraryError
from elm_jax.models.adapters import ExpertConfig, split_params
from elm_jax.models.t5 import Transformer
from elm_jax.models.t5_config import T5Config


@dataclasses.dataclass
class LoadedExperts:
  """`experts` leaves are [E, ...] in the order of `names`; `backbone` is the frozen part of
  `pretrained` (the full backbone checkpoint) under `expert_config`."""
  library: ExpertLibrary
  names: list[str]
  metadata: list[expert_files.ExpertMetadata]
  config: T5Config
  expert_config: ExpertConfig
  model: Transformer
  pretrained: Any
  backbone: Any
  experts: Any
  vocab_path: Optional[str]
  fingerprint: str

  def vocabulary(self):
    from elm_jax.vocabularies import SentencePieceVocabulary
    if self.vocab_path is None:
      raise UserInputError(f"{self.library.root}: the backbone checkpoint has no spiece.model; "
                           "pass --vocabulary=PATH")
    return SentencePieceVocabulary(self.vocab_path)


def backbone_checkpoint(library: ExpertLibrary, checkpoint: Optional[str]) -> str:
  path = checkpoint or library.manifest().get("backbone_checkpoint")
  if not path:
    raise LibraryError(f"{library.root}/manifest.json: records no backbone checkpoint; pass "
                       "--checkpoint=DIR (the Hugging Face or T5X checkpoint the experts were trained on)")
  if not os.path.exists(path):
    raise LibraryError(f"{path}: the backbone checkpoint is not there; pass --checkpoint=DIR")
  return path


def load_backbone(library: ExpertLibrary, checkpoint: Optional[str] = None, *, dtype: Optional[str] = None,
                  force: bool = False):
  """(the backbone checkpoint `checkpoint`, or the one the manifest records; its fingerprint),
  checked against the manifest's backbone fingerprint (a hash of every tensor) unless `force`:
  a changed, damaged or other checkpoint is refused before any expert is put on it."""
  from elm_jax.checkpoints import loading
  path = backbone_checkpoint(library, checkpoint)
  loaded = loading.load_model_checkpoint(path, dtype=dtype)
  recorded = library.manifest().get("backbone_fingerprint")
  fingerprint = expert_files.backbone_fingerprint(loaded.params)
  if recorded and not force:
    if fingerprint != recorded:
      raise LibraryError(f"{path}: the backbone's tensors hash to {fingerprint}, but the library's "
                         f"experts were trained on {recorded} ({library.root}/manifest.json: "
                         "backbone_fingerprint); the checkpoint changed or is another model: pass "
                         "the right --checkpoint (or --force to use it anyway)")
  return loaded, fingerprint


def load_experts(library_dir: str, selection: str | Sequence[str] = "all", *,
                 checkpoint: Optional[str] = None, dtype: Optional[str] = None,
                 vocabulary: Optional[str] = None, force: bool = False,
                 check_integrity: bool = True) -> LoadedExperts:
  """Loads the backbone (`checkpoint`, or the one the manifest records) and the selected
  experts, checking that they were trained on it (unless `force`) and that every expert file
  matches the manifest's sha256 (unless `check_integrity` is False, which warns)."""
  library = ExpertLibrary(library_dir, check_integrity=check_integrity)
  names = library.resolve(selection)
  loaded, fingerprint = load_backbone(library, checkpoint, dtype=dtype, force=force)
  stacked, metadata = library.load_stacked(names, None if force else fingerprint)
  expert_config = ExpertConfig(**metadata[0].expert_config)
  config = _model_config(library, names, metadata, loaded.config, expert_config)
  backbone, _ = split_params(loaded.params, expert_config)
  return LoadedExperts(library, names, metadata, config, expert_config,
                       Transformer(config, expert_config), loaded.params, backbone, stacked,
                       vocabulary or loaded.vocab_path, fingerprint)


def _model_config(library, names, metadata, config: T5Config, expert_config: ExpertConfig) -> T5Config:
  """The backbone's config, or the Mixture-of-Experts config that fully fine-tuned experts
  upcycled from it were trained with (all selected experts must agree)."""
  moe = {n: (m.training_config.get("model") or {}).get("moe") for n, m in zip(names, metadata)}
  kinds = {str(v) for v in moe.values()}
  if len(kinds) > 1:
    raise LibraryError(f"{library.root}: experts {names} mix dense and Mixture-of-Experts models "
                       "(field training_config.model.moe); select one kind at a time")
  first = next(iter(moe.values()))
  if first is None:
    return config
  if expert_config.kind != "full":
    raise LibraryError(f"{library.root}: expert {names[0]!r} has a Mixture-of-Experts model but "
                       f"kind {expert_config.kind!r}; only fully fine-tuned (upcycled) MoE models "
                       "can be loaded over a dense backbone")
  return config.replace(moe=first)


def score_instances(loaded: LoadedExperts, rows: Sequence[dict[str, Any]], *, batch_size: int = 32,
                    expert_chunk: Optional[int] = None, partitioner=None, max_input_length: int = 512,
                    max_target_length: int = 128, source: str = "instances"):
  """Every loaded expert on every instance's answer choices in one pass: (scores [E, N, C] with
  -inf on padded choices, token counts [N, C]). Instances without choices are an error."""
  from elm_jax.evaluation import rank_scoring
  vocabulary = loaded.vocabulary()
  examples = []
  for i, row in enumerate(rows):
    if not row.get("answer_choices"):
      raise UserInputError(f"{source}: instance {i} has no answer choices; rank scoring needs them "
                           "(generative tasks are evaluated by decoding)")
    examples.append(rank_scoring.Example(vocabulary.encode(row["inputs"]),
                                         vocabulary.encode_batch(row["answer_choices"])))
  scores, counts, scorer = rank_scoring.score_all_experts(
      loaded.model, loaded.backbone, loaded.experts, examples, batch_size=batch_size,
      expert_chunk=expert_chunk, partitioner=partitioner, max_input_length=max_input_length,
      max_target_length=max_target_length)
  scorer.truncated.report(max_input_length, max_target_length)
  return scores, counts
