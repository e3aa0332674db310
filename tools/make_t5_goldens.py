"""Builds the golden files that the JAX T5 parity tests compare against.

For three tiny, randomly initialised Hugging Face models -- T5 v1.1 (gated-GELU, untied
output projection), the original T5 (ReLU, output projection tied to the embedding, decoder
output scaled by d_model**-0.5) and mT5 (gated-GELU, untied, its own vocabulary size) -- this
script writes, under ``tests/golden/<variant>/``:

* ``config.json``, ``model.safetensors`` (``save_pretrained(..., safe_serialization=True)``;
  ``generation_config.json`` comes with it) and ``spiece.model`` (a tiny unigram SentencePiece
  model trained here on built-in English text, with T5's ids pad=0, eos=1, unk=2, no bos);
* ``reference.npz``: inputs, encoder outputs, teacher-forced logits, greedy and beam decodes;
* ``rank_input.jsonl`` / ``rank_reference.jsonl``: T0/ELM rank classification, where a choice
  scores the SUM of the log-probabilities of its tokens plus EOS (no length normalisation);

and ``tests/golden/README.md``. The JAX tests read these files and need no torch.

Why transformers 4.x: transformers 5.x always ties T5's input and output embeddings, which is
wrong for T5 v1.1 and mT5 (their ``lm_head`` is a separate matrix), so these goldens are made
with transformers 4.57.

Random initialisation gives near-uniform logits, which makes greedy decodes fragile (a tie
broken differently by float rounding changes the whole continuation). The weights are
therefore rescaled after init so the logits spread over several units, and the script asserts
that at every greedy step of every unfinished row the top-1 minus top-2 logit margin exceeds
``MIN_MARGIN``.

Beam search is ``num_beams=4, length_penalty=1.0, early_stopping=True``; whether the JAX beam
search reproduces it exactly is for the tests to decide. Both decodes are stored without the
leading decoder-start token and with pad (0) after the first EOS.

Everything is float32 and deterministic: re-running produces byte-identical files (the npz is
written with fixed zip timestamps).

Regenerate with:  .venv-golden/bin/python tools/make_t5_goldens.py
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_ROOT = REPO / "tests" / "golden"

MIN_MARGIN = 1e-2
MAX_NEW_TOKENS = 12
NUM_BEAMS = 4
SPM_VOCAB_SIZE = 256
PAD, EOS, UNK, START = 0, 1, 2, 0

COMMON = dict(
    d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=1.0,
    pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)

# Weight rescaling after HF's init (see module docstring), as multipliers: "emb" the shared
# embedding; "qk" the attention query/key kernels; "layer_out" every attention output (`o`) and
# MLP output (`wo`) kernel, which lets the sublayers outweigh the token embedding in the residual
# stream (a tied model otherwise just repeats its last token); "relpos" the relative position
# biases; "dec_final_ln" the decoder's final layer-norm scale (sets the tied model's logit
# scale); "out" the untied lm_head; "eos" the EOS row of the output projection (lm_head, or the
# shared embedding when tied), so that some greedy rows stop early. Seeds and scales were picked
# so that the greedy margin holds, no row emits pad (0) before EOS, and some rows end with EOS.
VARIANTS = {
    "t5_v1_1": dict(
        config_cls=T5Config, model_cls=T5ForConditionalGeneration, seed=1114,
        overrides=dict(vocab_size=320, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        scales=dict(emb=1.0, qk=2.0, layer_out=1.0, relpos=4.0, dec_final_ln=1.0, out=1.5, eos=2.0)),
    "t5_original": dict(
        config_cls=T5Config, model_cls=T5ForConditionalGeneration, seed=2227,
        overrides=dict(vocab_size=320, feed_forward_proj="relu", tie_word_embeddings=True),
        scales=dict(emb=1.0, qk=2.0, layer_out=4.0, relpos=4.0, dec_final_ln=4.0, out=1.0, eos=2.0)),
    "mt5": dict(
        config_cls=MT5Config, model_cls=MT5ForConditionalGeneration, seed=3322,
        overrides=dict(vocab_size=352, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        scales=dict(emb=1.0, qk=2.0, layer_out=1.0, relpos=4.0, dec_final_ln=1.0, out=1.5, eos=2.0)),
}

# Training text for the SentencePiece model (also the source of the long input row).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore every summer morning.",
    "The committee will meet on Tuesday to discuss the new budget.",
    "Rain is expected in the northern regions later this week.",
    "He opened the window and listened to the birds singing outside.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The library closes at nine o'clock on weekdays and noon on Sundays.",
    "Please remember to bring your passport and two photographs.",
    "Our team won the championship after a very difficult season.",
    "The recipe calls for three eggs, a cup of flour and some sugar.",
    "Mountains covered in snow rose high above the quiet valley.",
    "Children were playing football in the park until sunset.",
    "The museum exhibits paintings from the sixteenth century.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The train to London departs from platform four at noon.",
    "Is the movie good? Most critics said it was surprisingly funny.",
    "My grandmother grows tomatoes, beans and potatoes in her garden.",
    "The company reported higher profits than analysts had predicted.",
    "Learning a new language requires patience and daily practice.",
    "The old bridge was closed for repairs during the winter.",
    "Question: what is the capital of France? Answer: Paris.",
    "Translate to German: the house is small. Das Haus ist klein.",
    "Summarize the article in one sentence for a busy reader.",
    "The patient felt better after resting for two days.",
    "Bees collect nectar from flowers and turn it into honey.",
    "The new phone has a larger screen and a faster processor.",
    "They walked along the river and talked about their plans.",
    "Premise: the man is sleeping. Hypothesis: the man is awake.",
    "Is this review positive or negative? I loved every minute of it.",
    "The teacher asked the students to write an essay about history.",
    "Electric cars are becoming more popular in many countries.",
    "A cat sat quietly on the warm windowsill watching the street.",
    "The orchestra played a beautiful symphony by Beethoven.",
    "Farmers hope the dry weather will end before the harvest.",
    "Two plus three equals five, and five times two equals ten.",
]

REFERENCE_INPUTS = [
    "Summarize: the committee will meet on Tuesday to discuss the budget.",
    "Question: what is the capital of France?",
    None,  # the long row, built from CORPUS in `_long_text`
    "Is this review positive? I loved it.",
]
REFERENCE_TARGETS = [
    "The committee meets Tuesday.",
    "Paris.",
    "A fox and a dog.",
    "positive",
]
LONG_MIN, LONG_MAX = 150, 180

RANK_EXAMPLES = [
    {"id": "r0", "inputs": "Is this review positive or negative? I loved every minute of it.",
     "choices": ["positive", "negative"]},
    {"id": "r1", "inputs": "Question: what is the capital of France?",
     "choices": ["Paris", "London", "Berlin"]},
    {"id": "r2", "inputs": "Premise: the man is sleeping. Hypothesis: the man is awake. "
                           "Does the premise entail the hypothesis?",
     "choices": ["yes", "maybe", "no", "it is impossible to say"]},
    {"id": "r3", "inputs": "Water boils at what temperature at sea level?",
     "choices": ["one hundred degrees Celsius", "ten degrees"]},
    {"id": "r4", "inputs": "Which animal makes honey?",
     "choices": ["bees", "a cat sat quietly", "farmers"]},
]


# ------------------------------------------------------------------------------ helpers
def train_sentencepiece(path: pathlib.Path) -> spm.SentencePieceProcessor:
  """Trains the tiny unigram model deterministically and writes it to `path`."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, model_type="unigram",
      vocab_size=SPM_VOCAB_SIZE, character_coverage=1.0,
      pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
      # "identity" instead of T5's nmt_nfkc keeps the file ~240 KB smaller (no charsmap).
      normalization_rule_name="identity",
      input_sentence_size=1000, shuffle_input_sentence=False,
      seed_sentencepiece_size=100000, num_threads=1, hard_vocab_limit=True,
      minloglevel=2)
  path.write_bytes(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  assert sp.get_piece_size() == SPM_VOCAB_SIZE, sp.get_piece_size()
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD, EOS, UNK, -1)
  return sp


def encode(sp, text: str) -> list[int]:
  return list(sp.encode(text)) + [EOS]


def _long_text(sp) -> str:
  """Joins CORPUS sentences (cycling) until the tokenized text + EOS is LONG_MIN..LONG_MAX long."""
  parts, i = [], 0
  while len(encode(sp, " ".join(parts))) < LONG_MIN:
    parts.append(CORPUS[i % len(CORPUS)])
    i += 1
  text = " ".join(parts)
  n = len(encode(sp, text))
  assert LONG_MIN <= n <= LONG_MAX, n
  return text


def pad_rows(rows: list[list[int]], length: int | None = None) -> np.ndarray:
  length = length or max(len(r) for r in rows)
  out = np.full((len(rows), length), PAD, dtype=np.int32)
  for i, r in enumerate(rows):
    assert len(r) <= length
    out[i, :len(r)] = r
  return out


def scale_weights(model, scales: dict[str, float]) -> None:
  """Multiplies weights after init so logits are spread out (see `VARIANTS`)."""
  with torch.no_grad():
    model.shared.weight.mul_(scales["emb"])
    for name, p in model.named_parameters():
      if name.endswith((".q.weight", ".k.weight")):
        p.mul_(scales["qk"])
      elif name.endswith((".o.weight", ".wo.weight")):
        p.mul_(scales["layer_out"])
      elif name.endswith("relative_attention_bias.weight"):
        p.mul_(scales["relpos"])
    model.decoder.final_layer_norm.weight.mul_(scales["dec_final_ln"])
    if model.config.tie_word_embeddings:
      model.shared.weight[EOS].mul_(scales["eos"])
    else:
      model.lm_head.weight.mul_(scales["out"])
      model.lm_head.weight[EOS].mul_(scales["eos"])


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Like np.savez, but with fixed zip timestamps so the bytes are reproducible."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.external_attr = 0o644 << 16
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buf.getvalue())


def manual_greedy(model, input_ids, attention_mask) -> tuple[np.ndarray, float]:
  """Cache-free greedy decode by full forward passes; returns tokens [B, T] and the min margin."""
  b = input_ids.shape[0]
  dec = torch.full((b, 1), START, dtype=torch.long)
  done = torch.zeros(b, dtype=torch.bool)
  min_margin = float("inf")
  with torch.no_grad():
    enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask)
    for _ in range(MAX_NEW_TOKENS):
      logits = model(encoder_outputs=enc, attention_mask=attention_mask,
                     decoder_input_ids=dec).logits[:, -1, :]
      top2 = torch.topk(logits, 2, dim=-1).values
      margins = (top2[:, 0] - top2[:, 1])[~done]
      if margins.numel():
        min_margin = min(min_margin, float(margins.min()))
      nxt = torch.where(done, torch.tensor(PAD), logits.argmax(-1))
      dec = torch.cat([dec, nxt[:, None]], dim=1)
      done = done | (nxt == EOS)
      if bool(done.all()):
        break
  return pad_rows(dec[:, 1:].tolist(), MAX_NEW_TOKENS), min_margin


def generate(model, input_ids, attention_mask, num_beams: int) -> np.ndarray:
  kwargs = dict(do_sample=False, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
  if num_beams > 1:
    kwargs.update(length_penalty=1.0, early_stopping=True)
  with torch.no_grad():
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
  out = out.numpy()
  assert (out[:, 0] == START).all(), out[:, 0]
  rows = out[:, 1:]
  assert rows.shape[1] <= MAX_NEW_TOKENS, rows.shape
  result = pad_rows(rows.tolist(), MAX_NEW_TOKENS)
  for r in result:
    hits = np.nonzero(r == EOS)[0]
    end = hits[0] if hits.size else len(r)
    assert (r[:end] != PAD).all(), f"pad emitted before EOS: {r}"
    # Greedy fills after EOS with pad (0). Beam search in transformers 4.57 fills with EOS (1)
    # when pad_token_id is 0 (`pad_token_id or eos_token_id[0]` treats pad 0 as missing); the
    # goldens use pad (0) after the first EOS for both.
    assert np.isin(r[end + 1:], (PAD, EOS)).all(), r
    r[end + 1:] = PAD
  return result


def rank_scores(model, sp, example) -> dict:
  """Sum over choice tokens + EOS of float32 log-probs, accumulated in float64."""
  inputs = torch.tensor([encode(sp, example["inputs"])])
  scores, lengths = [], []
  with torch.no_grad():
    for choice in example["choices"]:
      target = encode(sp, choice)
      dec_in = torch.tensor([[START] + target[:-1]])
      logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                     decoder_input_ids=dec_in).logits[0]
      logp = torch.log_softmax(logits.float(), dim=-1)
      tok = logp[torch.arange(len(target)), torch.tensor(target)]
      scores.append(float(tok.double().sum()))
      lengths.append(len(target))
  return {"id": example["id"], "scores": scores, "prediction": int(np.argmax(scores)),
          "lengths": lengths}


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------ variants
def build_variant(name: str, spec: dict, sp, spiece_path: pathlib.Path) -> dict:
  out_dir = GOLDEN_ROOT / name
  if out_dir.exists():
    shutil.rmtree(out_dir)
  out_dir.mkdir(parents=True)

  torch.manual_seed(spec["seed"])
  config = spec["config_cls"](**COMMON, **spec["overrides"])
  model = spec["model_cls"](config).float().eval()
  scale_weights(model, spec["scales"])
  vocab = config.vocab_size
  assert SPM_VOCAB_SIZE <= vocab

  texts = [t if t is not None else _long_text(sp) for t in REFERENCE_INPUTS]
  input_ids = pad_rows([encode(sp, t) for t in texts])
  attention_mask = (np.arange(input_ids.shape[1])[None, :]
                    < np.array([len(encode(sp, t)) for t in texts])[:, None]).astype(np.int32)
  targets = [encode(sp, t) for t in REFERENCE_TARGETS]
  decoder_target_ids = pad_rows(targets)
  decoder_input_ids = pad_rows([[START] + t[:-1] for t in targets])
  decoder_mask = (decoder_target_ids != PAD).astype(np.int32)

  ii, am = torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()
  with torch.no_grad():
    encoder_outputs = model.encoder(input_ids=ii, attention_mask=am).last_hidden_state
    logits = model(input_ids=ii, attention_mask=am,
                   decoder_input_ids=torch.from_numpy(decoder_input_ids).long(),
                   decoder_attention_mask=torch.from_numpy(decoder_mask).long()).logits

  greedy = generate(model, ii, am, num_beams=1)
  manual, min_margin = manual_greedy(model, ii, am)
  assert np.array_equal(greedy, manual), (greedy, manual)
  assert min_margin > MIN_MARGIN, f"{name}: greedy top-1/top-2 margin {min_margin} <= {MIN_MARGIN}"
  beam = generate(model, ii, am, num_beams=NUM_BEAMS)

  arrays = {
      "input_ids": input_ids, "attention_mask": attention_mask,
      "decoder_input_ids": decoder_input_ids, "decoder_target_ids": decoder_target_ids,
      "decoder_mask": decoder_mask,
      "encoder_outputs": encoder_outputs.numpy().astype(np.float32),
      "logits": logits.numpy().astype(np.float32),
      "greedy": greedy.astype(np.int32), "beam": beam.astype(np.int32),
  }
  model.save_pretrained(out_dir, safe_serialization=True)
  shutil.copyfile(spiece_path, out_dir / "spiece.model")
  save_npz(out_dir / "reference.npz", arrays)

  # Round trip: the saved checkpoint must reproduce the logits exactly.
  reloaded = spec["model_cls"].from_pretrained(out_dir).float().eval()
  with torch.no_grad():
    logits2 = reloaded(input_ids=ii, attention_mask=am,
                       decoder_input_ids=torch.from_numpy(decoder_input_ids).long(),
                       decoder_attention_mask=torch.from_numpy(decoder_mask).long()).logits
  assert torch.equal(logits, logits2), f"{name}: reloaded checkpoint gives different logits"

  write_jsonl(out_dir / "rank_input.jsonl", RANK_EXAMPLES)
  write_jsonl(out_dir / "rank_reference.jsonl", [rank_scores(model, sp, ex) for ex in RANK_EXAMPLES])

  real = decoder_mask.astype(bool)
  spread = float(logits.numpy()[real].std(axis=-1).mean())
  print(f"[{name}] vocab={vocab} tied={config.tie_word_embeddings} "
        f"min greedy margin={min_margin:.4f} mean logit std={spread:.3f}")
  for k in sorted(arrays):
    print(f"  {k:20s} {arrays[k].dtype} {arrays[k].shape}")
  print("  greedy:", greedy.tolist())
  print("  beam:  ", beam.tolist())
  return {"min_margin": min_margin}


README = """\
# Golden files for the T5 parity tests

Made by `tools/make_t5_goldens.py` with torch {torch}, transformers {transformers},
sentencepiece {sentencepiece}, numpy {numpy} (Python {python}). The JAX tests read them and
need no torch. Regenerate (deterministic, byte-identical) with:

    .venv-golden/bin/python tools/make_t5_goldens.py

transformers 4.x is required: 5.x always ties T5's input and output embeddings, which is
wrong for T5 v1.1 and mT5.

## Variants (one directory each)

| dir | HF class | feed_forward_proj | tie_word_embeddings | vocab_size |
|---|---|---|---|---|
| `t5_v1_1` | T5ForConditionalGeneration | gated-gelu (`gelu_new`) | false | 320 |
| `t5_original` | T5ForConditionalGeneration | relu | true (decoder output x d_model**-0.5) | 320 |
| `mt5` | MT5ForConditionalGeneration | gated-gelu (`gelu_new`) | false | 352 |

All: d_model=32, d_kv=8, num_heads=4, d_ff=64, 2 encoder + 2 decoder layers, 32 relative
buckets, max distance 128, eps 1e-6, pad=0, eos=1, decoder start=0, float32. Weights are
random (fixed torch seeds) and rescaled after init so greedy decoding has a top-1/top-2 logit
margin > {margin} at every step (asserted by the script).

## Files in each directory

- `config.json`, `generation_config.json`, `model.safetensors`: `save_pretrained(...,
  safe_serialization=True)`. For the tied model only `shared.weight` is stored (no
  `lm_head.weight`); `encoder.embed_tokens`/`decoder.embed_tokens` are never stored.
  `t5_original/config.json` has no `tie_word_embeddings` key: it equals the T5 default
  (true) and transformers leaves defaults out, as in the real t5-base config.
- `spiece.model`: a tiny unigram SentencePiece model (vocab {spm_vocab}; pad=0, eos=1,
  unk=2, no bos; normalization rule "identity" rather than T5's nmt_nfkc, which would add
  ~240 KB per copy), the same file in every directory.
- `reference.npz`:
  - `input_ids`, `attention_mask` [B=4, Li] int32: sentencepiece ids + EOS, right-padded
    with 0; row 2 is {long_len} tokens long, so relative positions beyond 128 are exercised.
  - `decoder_input_ids`, `decoder_target_ids`, `decoder_mask` [B, Ld] int32: targets + EOS,
    and the same shifted right with start id 0.
  - `encoder_outputs` [B, Li, d_model] float32: `model.encoder(...).last_hidden_state`.
  - `logits` [B, Ld, V] float32: teacher-forced, with `decoder_attention_mask=decoder_mask`;
    compare only where `decoder_mask == 1` (padded positions depend on masking details).
  - `greedy` [B, {t}] int32: `generate(do_sample=False, num_beams=1, max_new_tokens={t})`
    without the leading start token, right-padded with 0 (0 also follows EOS).
  - `beam` [B, {t}] int32: the same with `num_beams={beams}, length_penalty=1.0,
    early_stopping=True`. (transformers 4.57 beam search fills after EOS with EOS, not pad,
    when pad_token_id is 0; the script rewrites that fill to 0 so both arrays agree.)
- `rank_input.jsonl`: `{{"id", "inputs", "choices"}}` per line (2-4 choices).
- `rank_reference.jsonl`: `{{"id", "scores", "prediction", "lengths"}}`: score = SUM over the
  choice's tokens + EOS of teacher-forced float32 log_softmax log-probabilities (summed in
  float64), inputs = text + EOS, no length normalisation; `prediction` = argmax; `lengths` =
  token count of each choice including EOS (for length-normalised checks).
"""


def main() -> int:
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  versions = dict(torch=torch.__version__, transformers=transformers.__version__,
                  sentencepiece=spm.__version__, numpy=np.__version__,
                  python=sys.version.split()[0])
  print("versions:", versions)
  if not transformers.__version__.startswith("4."):
    raise SystemExit(f"transformers 4.x required, found {transformers.__version__}")
  transformers.logging.set_verbosity_error()

  GOLDEN_ROOT.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    spiece_path = pathlib.Path(tmp) / "spiece.model"
    sp = train_sentencepiece(spiece_path)
    long_len = len(encode(sp, _long_text(sp)))
    for name, spec in VARIANTS.items():
      build_variant(name, spec, sp, spiece_path)
  (GOLDEN_ROOT / "README.md").write_text(README.format(
      margin=MIN_MARGIN, spm_vocab=SPM_VOCAB_SIZE, long_len=long_len, t=MAX_NEW_TOKENS,
      beams=NUM_BEAMS, **versions))
  total = sum(p.stat().st_size for p in GOLDEN_ROOT.rglob("*") if p.is_file())
  print(f"wrote {GOLDEN_ROOT} ({total / 1024:.1f} KiB)")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
