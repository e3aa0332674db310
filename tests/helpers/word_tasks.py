"""Two tiny prompted tasks over a 12-word vocabulary, for tests that train experts: `reverse`
(the five input words reversed) and `first` (the first input word)."""

import pathlib

import numpy as np
import seqio

from tasks import prompted

SPM = str(pathlib.Path(__file__).parents[1] / "golden" / "t5_v1_1" / "spiece.model")
WORDS = "the cat dog sat ran on a mat big small red blue".split()
KINDS = ("reverse", "first")


def rows(kind: str, count: int = 64):
  """The rows function of task `kind`: `count` rows a split (train and validation differ)."""
  def rows_fn(split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    out = []
    for _ in range(count):
      words = list(rng.choice(WORDS, 5))
      target = " ".join(reversed(words)) if kind == "reverse" else words[0]
      out.append({"inputs": f"{kind}: " + " ".join(words), "targets": target})
    return out
  return rows_fn


def register(prefix: str, count: int = 64) -> tuple[str, ...]:
  """Registers `{prefix}_reverse` and `{prefix}_first` (T5 v1.1's SentencePiece vocabulary);
  returns their names."""
  vocab = seqio.SentencePieceVocabulary(SPM)
  for kind in KINDS:
    prompted.register_prompted_task(f"{prefix}_{kind}", rows(kind, count), vocab, score_eval=False)
  return tuple(f"{prefix}_{kind}" for kind in KINDS)
