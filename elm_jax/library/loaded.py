"""A library's experts on their backbone, ready to score: what `score`, `eval`, `retrieve` and
`merge` share."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from elm_jax import tree_paths
from elm_jax.checkpoints import expert_files, loading
from elm_jax.expert_stack import ExpertsOnBackbone
from elm_jax.library.store import ExpertLibrary, LibraryError
from elm_jax.models.experts import ExpertConfig, ExpertSet
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedExperts(ExpertsOnBackbone):
  """Library experts on their backbone: the stack (leaves [E, ...] in the order of `names`),
  the frozen part of `pretrained` (the full backbone checkpoint) they run on, their metadata,
  and the library and backbone fingerprint they came from."""
  library: Optional[ExpertLibrary] = None
  metadata: tuple[expert_files.ExpertMetadata, ...] = ()
  pretrained: Any = None
  fingerprint: Optional[str] = None


def backbone_checkpoint(library: ExpertLibrary, checkpoint: Optional[str]) -> str:
  path = checkpoint or library.manifest().get("backbone_checkpoint")
  if not path:
    raise LibraryError(f"{library.root}/manifest.json: records no backbone checkpoint; pass "
                       "--checkpoint=DIR (the Hugging Face or T5X checkpoint the experts were trained on)")
  if not os.path.exists(path):
    raise LibraryError(f"{path}: the backbone checkpoint is not there; pass --checkpoint=DIR")
  return path


def load_backbone(library: ExpertLibrary, checkpoint: Optional[str] = None, *, dtype: Optional[str] = None,
                  force: bool = False, config: Optional[T5Config] = None):
  """(the backbone checkpoint `checkpoint`, or the one the manifest records; its fingerprint),
  checked against the manifest's backbone fingerprint (a hash of every tensor) unless `force`:
  a changed, damaged or other checkpoint is refused before any expert is put on it."""
  path = backbone_checkpoint(library, checkpoint)
  loaded = loading.load_model_checkpoint(path, config=config, dtype=dtype)
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
                 check_integrity: bool = True, config: Optional[T5Config] = None,
                 softmax_vocab_size: Optional[int] = None) -> LoadedExperts:
  """Loads the backbone (`checkpoint`, or the one the manifest records; `config` for a T5X
  checkpoint, which carries none) and the selected experts, checking that they were trained on
  it (unless `force`) and that every expert file matches the manifest's sha256 (unless
  `check_integrity` is False, which warns) and holds exactly its kind's parameters on this
  backbone, all finite. Each expert file is read once and stacked once; experts of several
  kinds share one stack (`expert_stack.stack_mixed`) and are scored in one pass.
  Scores normalise over the vocabulary the experts were trained with (their recorded
  `softmax_vocab_size`: 32,100 for the paper's recipes) unless `softmax_vocab_size` says."""
  library = ExpertLibrary(library_dir, check_integrity=check_integrity)
  names = library.resolve(selection)
  loaded, fingerprint = load_backbone(library, checkpoint, dtype=dtype, force=force, config=config)
  stack, metadata = library.load_stack(names, None if force else fingerprint, pretrained=loaded.params)
  expert_config = stack.expert_config
  model_config = _model_config(library, names, metadata, loaded.config, expert_config)
  model_config = model_config.replace(
      softmax_vocab_size=softmax_vocab_size or _recorded_softmax_vocab(library, names, metadata))
  _check_fits(library, names, stack, model_config, backbone_checkpoint(library, checkpoint))
  model = EncoderDecoderModel.build(model_config, expert_config)
  backbone, _ = model.split_params(loaded.params)
  return LoadedExperts(model=model, backbone=backbone,
                       stack=stack, vocab_path=vocabulary or loaded.vocab_path, library=library,
                       metadata=tuple(metadata), pretrained=loaded.params, fingerprint=fingerprint,
                       source_lengths={n: _source_length(m) for n, m in zip(names, metadata)})


def _source_length(metadata: expert_files.ExpertMetadata) -> Optional[int]:
  """The input length an expert was trained with (its expert.json's training_config), or None
  (a merged or imported expert that records none)."""
  config = metadata.training_config if isinstance(metadata.training_config, dict) else {}
  length = config.get("input_length")
  return length if isinstance(length, int) and not isinstance(length, bool) and length > 1 else None


def _check_fits(library, names, stack, model_config: T5Config, checkpoint: str) -> None:
  """Refuses a stack whose tensors are not exactly the parameter list of its kind on the model
  the experts will run on (each file was checked against the backbone its expert.json records;
  this catches a backbone of another shape, loaded with --force, or experts recording none)."""
  expected = expert_files.parameter_list(stack.expert_config, model_config,
                                         f"{library.root}: expert {names[0]!r}")
  layout = {tree_paths.join(p): (v.shape[1:], v.dtype) for p, v in tree_paths.flatten(stack.params).items()}
  problems = expert_files.layout_problems(layout, stack.expert_config, expected)
  if problems:
    others = f" (and the {len(names) - 1} other(s) loaded with it)" if len(names) > 1 else ""
    raise LibraryError(f"{library.root / 'experts' / expert_files.directory_name(names[0])}{others}: "
                       f"{problems[0]}, for the backbone they run on ({checkpoint})")


def _recorded_softmax_vocab(library, names, metadata) -> Optional[int]:
  """The `softmax_vocab_size` the experts were trained with (they must agree), or None."""
  found = {(m.training_config.get("model") or {}).get("softmax_vocab_size") for m in metadata}
  if len(found) > 1:
    raise LibraryError(f"{library.root}: experts {list(names)} were trained with different softmax "
                       f"vocabularies {sorted(found, key=str)} (training_config.model.softmax_vocab_size); "
                       "select experts of one kind, or pass --softmax_vocab_size")
  return found.pop()


def _model_config(library, names, metadata, config: T5Config, expert_config: ExpertConfig | ExpertSet) -> T5Config:
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
  if not expert_config.trains_backbone:
    raise LibraryError(f"{library.root}: expert {names[0]!r} has a Mixture-of-Experts model but "
                       f"kind {expert_config.label!r}; only fully fine-tuned (upcycled) MoE models "
                       "can be loaded over a dense backbone")
  return config.replace(moe=first)
