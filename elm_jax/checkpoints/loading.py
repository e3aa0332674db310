"""One entry point from a checkpoint directory to a ready model: config, parameters, vocabulary.

Hugging Face directories carry their own config; T5X checkpoints (legacy and Orbax) carry none,
so the caller passes one (the commands take it from a gin model file,
`--gin_file=gin_configs/models/t5_1_1_xl.gin`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from elm_jax.checkpoints import hf, t5x
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config


@dataclasses.dataclass
class LoadedModel:
  config: T5Config
  model: EncoderDecoderModel
  params: Any
  vocab_path: Optional[str]
  source: str


def load_model_checkpoint(path: str, config: Optional[T5Config] = None,
                          dtype: Optional[str] = None, softmax_vocab_size: Optional[int] = None) -> LoadedModel:
  """Loads any supported checkpoint; `dtype` sets the activation dtype (params stay float32),
  `softmax_vocab_size` the logits scores are normalised over (default: all)."""
  if not os.path.exists(path):
    raise hf.CheckpointError(f"{path}: checkpoint directory not found")
  try:
    config, params, vocab_path = _read(path, config)
  except OSError as e:  # an unreadable directory or file (mode 000), named with the reason
    raise hf.CheckpointError(f"{e.filename or path}: cannot be read ({e.strerror or e})") from None
  if dtype is not None:
    config = config.replace(dtype=dtype)
  if softmax_vocab_size is not None:
    config = config.replace(softmax_vocab_size=softmax_vocab_size)
  return LoadedModel(config, EncoderDecoderModel.build(config), params, vocab_path, path)


def _read(path: str, config: Optional[T5Config]) -> tuple[T5Config, Any, Optional[str]]:
  """(config, parameters, vocabulary path) of the checkpoint at `path`."""
  if t5x.detect_checkpoint_format(path) == "hf":
    loaded = hf.load_hf_checkpoint(path)
    return loaded.config, loaded.params, loaded.vocab_path
  if config is None:
    raise hf.CheckpointError(f"{path}: a T5X checkpoint has no config.json; pass a model gin file, "
                             "e.g. --gin_file=gin_configs/models/t5_1_1_xl.gin")
  params = t5x.load_t5x_checkpoint(path, config)
  for candidate in (os.path.join(path, "spiece.model"),
                    os.path.join(os.path.dirname(os.path.abspath(path)), "spiece.model")):
    if os.path.isfile(candidate):
      return config, params, candidate
  return config, params, None
