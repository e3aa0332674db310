"""SentencePiece vocabulary with T5's conventions (pad 0, EOS 1, unk 2; EOS appended by callers)."""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

from elm_jax.errors import UserInputError


class VocabularyError(UserInputError):
  """A vocabulary file that is missing or unreadable."""


class SentencePieceVocabulary:
  """Text <-> token ids through a SentencePiece model file (`spiece.model`)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise VocabularyError(f"{path}: SentencePiece model file not found")
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise VocabularyError(f"{path}: not a readable SentencePiece model ({e})") from e

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._sp.EncodeAsIds(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, stopping at the first EOS and skipping padding. Ids past the SentencePiece
    model (a model's embedding is often padded, e.g. 32128 rows for 32100 pieces) decode as
    unknown, as seqio does."""
    out = []
    size, unk = self.vocab_size, self._sp.unk_id()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != 0:
        out.append(i if i < size else unk)
    return self._sp.DecodeIds(out)
