"""The built-in suite as SeqIO tasks and mixtures, with a SentencePiece vocabulary trained on
its text (cached on disk by a hash of the text and the training settings).

Tasks: `builtin_<dataset>_<prompt>` (text-to-text) and, for multiple-choice prompts,
`..._score_eval`. Mixtures: `builtin_train` (every training prompt), `builtin_<dataset>_all_prompts`
(dataset experts), `builtin_held_out` (the held-out clusters' `_score_eval` tasks),
`builtin_continual`, `builtin_composed`. Registration generates nothing; examples are generated
when a dataset is requested.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Optional

import seqio
import sentencepiece as spm

from tasks import builtin_suite, prompted, row_order
from tasks.mixtures import add_mixture

VOCAB_SIZE = 1000
_REGISTERED = None  # (settings, mixture names, task names) of the current registration
_task_names: set = set()
_SPM_SETTINGS = dict(model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
                     bos_id=-1, hard_vocab_limit=False, input_sentence_size=100_000,
                     shuffle_input_sentence=False, num_threads=1)


def _cache_dir(cache_dir: Optional[str]) -> str:
  return cache_dir or os.environ.get("ELM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "elm_jax")


def builtin_vocabulary(cache_dir: Optional[str] = None, vocab_size: int = VOCAB_SIZE) -> str:
  """Path of a SentencePiece model trained on the suite's text (trained once, then cached)."""
  text = list(builtin_suite.all_text(100))
  digest = hashlib.sha256(("\n".join(text) + repr(sorted(_SPM_SETTINGS.items())) +
                           str(vocab_size)).encode()).hexdigest()[:16]
  directory = _cache_dir(cache_dir)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"builtin_spm_{digest}.model")
  if os.path.isfile(path):
    return path
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      f.write("\n".join(text))
    prefix = os.path.join(tmp, "spm")
    spm.SentencePieceTrainer.Train(input=corpus, model_prefix=prefix, vocab_size=vocab_size,
                                   minloglevel=2, **_SPM_SETTINGS)
    os.replace(prefix + ".model", path)  # atomic: concurrent trainers write the same content
  return path


@functools.lru_cache(maxsize=512)
def _generated(dataset: str, prompt: str, split: str, count: int, seed: int) -> tuple:
  """Examples are generated once per process: training, retrieval keys and evaluation all read them."""
  return tuple(builtin_suite.generate(dataset, prompt, split, count, seed))


def register_builtin_suite(num_train: int = 2000, num_eval: int = 200, seed: int = 0,
                           cache_dir: Optional[str] = None) -> dict[str, list[str]]:
  """Registers every built-in task and mixture; returns mixture -> members. Idempotent for the
  same settings; other settings replace the earlier registration."""

  global _REGISTERED
  settings = (num_train, num_eval, seed, cache_dir)
  if _REGISTERED is not None and _REGISTERED[0] != settings:
    for name in _REGISTERED[1]:
      seqio.MixtureRegistry.remove(name)
    for name in list(seqio.TaskRegistry.names()):
      if name.startswith("builtin_") and name in _REGISTERED[2]:
        seqio.TaskRegistry.remove(name)
  vocabulary = seqio.SentencePieceVocabulary(builtin_vocabulary(cache_dir))
  counts = {"train": num_train, "validation": num_eval}
  mixtures: dict[str, list[str]] = {"builtin_train": [], "builtin_held_out": [],
                                    "builtin_continual": [], "builtin_composed": []}
  for spec in builtin_suite.SUITE:
    name = builtin_suite.task_name(spec.dataset, spec.prompt)

    def rows_fn(split, spec=spec):
      return list(_generated(spec.dataset, spec.prompt, split, counts[split], seed))

    names = prompted.register_prompted_task(name, rows_fn, vocabulary, score_eval=spec.multiple_choice,
                                            source=f"built-in suite {spec.dataset}/{spec.prompt}")
    _task_names.update(names)
    if spec.role == "train":
      mixtures["builtin_train"].append(name)
      mixtures.setdefault(f"builtin_{spec.dataset}_all_prompts", []).append(name)
    elif spec.role == "held_out":
      mixtures["builtin_held_out"].append(names[-1])
    else:
      mixtures[f"builtin_{spec.role}"].append(name)
  for mixture, members in mixtures.items():
    add_mixture(mixture, members, source="built-in suite")
    if mixture.endswith("_all_prompts"):  # a dataset expert's prompts, concatenated
      row_order.register_order(mixture, "concatenated")
  _REGISTERED = (settings, list(mixtures), set(_task_names))
  return mixtures
