"""`elm-jax embed`: one text per line -> a float32 .npy of L2-normalised rows [lines, dim].
`--output` may also be a device or a FIFO (`/dev/stdout`), written in place.

    elm-jax embed --embedder=minilm --input=texts.txt --output=texts.npy
    elm-jax embed --embedder=t5 --checkpoint=BACKBONE --input=texts.txt --output=texts.npy
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from elm_jax import files
from elm_jax.checkpoints import loading
from elm_jax.commands import flags, gin_utils
from elm_jax.errors import UserInputError
from elm_jax.library import retrieval
from elm_jax.vocabularies import SentencePieceVocabulary


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--embedder", choices=("minilm", "t5"), default="minilm")
  parser.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
  parser.add_argument("--output", required=True, help=".npy file to write")
  parser.add_argument("--max_length", type=flags.token_length, default=retrieval.KEY_MAX_LENGTH,
                      help="tokens per text (the paper: 256 for keys, 512 for queries)")
  parser.add_argument("--checkpoint", default=None, help="T5 checkpoint for --embedder=t5")
  parser.add_argument("--minilm_dir", default=None, help="MiniLM directory (default: the installed package)")


def read_lines(path: str) -> list[str]:
  """The file's lines; refused, naming `path:line`, when a line is not UTF-8."""
  files.check_input_file(path, "--input")
  lines = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        lines.append(raw.decode("utf-8").rstrip("\r\n"))
      except UnicodeDecodeError as e:
        raise UserInputError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                             f"{e.start + 1})") from None
  if not lines:
    raise UserInputError(f"{path}: no lines to embed (the file is empty)")
  return lines


def main(args: argparse.Namespace) -> int:
  read = files.directories_read(checkpoint=args.checkpoint if args.embedder == "t5" else None)
  if args.minilm_dir:
    read.append((args.minilm_dir, "the MiniLM directory"))
  files.check_output_file(args.output, "--output", inputs=[args.input], within=read)
  texts = read_lines(args.input)
  if args.embedder == "minilm":
    embedder = retrieval.MiniLMTextEmbedder(args.minilm_dir)
  else:
    if not args.checkpoint:
      raise UserInputError("--embedder=t5 needs --checkpoint=DIR (a T5 checkpoint with spiece.model)")
    loaded = loading.load_model_checkpoint(args.checkpoint, config=gin_utils.model_config_or_none())
    if loaded.vocab_path is None:
      raise UserInputError(f"{args.checkpoint}: no spiece.model in the checkpoint directory")
    embedder = retrieval.T5EncoderEmbedder(loaded.model, loaded.params, SentencePieceVocabulary(loaded.vocab_path))
  vectors = embedder.embed(texts, args.max_length).astype(np.float32)
  buffer = io.BytesIO()
  np.save(buffer, vectors)
  files.write_output(args.output, buffer.getvalue())
  print(f"embedded {len(texts)} lines -> {args.output} {list(vectors.shape)}", file=sys.stderr)
  return 0
