"""The hostile-input corpus: every command given faulty, malicious or careless input, as a new
user (or a library from a shared bucket) would give it.

Each case builds its inputs in a fresh directory, runs `elm-jax` in this process, and asserts
(`tests/hostile/harness.py`): the exit status; exactly one line of stderr saying `error:` that
names the problem (no traceback); and that every file that existed before is byte-identical
afterwards and nothing new was left behind (except where a case says what a successful command
writes). Later rounds keep their cases in the sibling `test_hostile_*.py` modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

import pytest

from elm_jax.commands import cli
from tests.hostile.harness import (REPO, TASKS, Case, World, lib_arg, run_case, train_args,
                                   user_model_dir)

CASES = [
    # ------------------------------------------------------------------ train
    Case("train: an expert named '..' (used to delete MODEL_DIR)",
         lambda w: train_args(user_model_dir(w), ["builtin_sentiment_is_positive", "builtin_topic_which_topic"],
                               "--gin.EXPERT_NAMES=['ok', '..']"),
         message=r"expert_names: '\.\.' is not a usable expert name"),
    Case("train: two names mapping to one directory",
         lambda w: train_args(user_model_dir(w), TASKS, "--gin.EXPERT_NAMES=['a/b', 'a_b']"),
         message=r"'a/b' and 'a_b' both map to the directory name 'a_b'"),
    Case("train: an empty expert name",
         lambda w: train_args(user_model_dir(w), TASKS, "--gin.EXPERT_NAMES=['', 'b']"),
         message=r"expected a non-empty name"),
    Case("train: an unknown task, refused before the backbone is built",
         lambda w: train_args(w.path("model"), ["builtin_sentiment_is_positive", "no_such_task"]),
         message=r"'no_such_task' is not a registered SeqIO task"),
    Case("train: MODEL_DIR is a file",
         lambda w: train_args(w.write("model_file", "x")),
         message=r"MODEL_DIR=.*model_file: exists and is not a directory"),
    Case("train: EXPERT_TASKS is a string, not a list",
         lambda w: train_args(w.path("model"), "builtin_sentiment_is_positive"),
         message=r"EXPERT_TASKS: expected a list of names"),
    Case("train: zero steps",
         lambda w: train_args(w.path("model"), TASKS, "--gin.TRAIN_STEPS=0"),
         message=r"TrainConfig.steps: expected a positive integer, got 0"),
    Case("train: a target length of 1",
         lambda w: train_args(w.path("model"), TASKS, "--gin.TARGET_LENGTH=1"),
         message=r"TrainConfig.target_length: expected an integer of at least 2"),
    # ------------------------------------------------------------------ score
    Case("score: --output is the --input",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('in.jsonl')}"],
         message=r"--output=.*in.jsonl: is also an input"),
    Case("score: --output is a directory",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.library()}"],
         message=r"--output=.*lib: is a directory"),
    Case("score: --output in a missing directory",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('nowhere', 'o.jsonl')}"],
         message=r"--output=.*o.jsonl: the directory .*nowhere does not exist"),
    Case("score: invalid UTF-8 in the input",
         lambda w: ["score", lib_arg(w), f"--input={w.write('bad.jsonl', b'{}' + bytes([0x0a, 0x0a, 0x7b, 0xff, 0x7d, 0x0a]))}",
                    f"--output={w.path('o.jsonl')}"],
         message=r"bad.jsonl:3: not UTF-8 text \(byte 0xff at column 2\)"),
    Case("score: the input is a directory",
         lambda w: ["score", lib_arg(w), f"--input={w.library()}", f"--output={w.path('o.jsonl')}"],
         message=r"--input=.*lib: is a directory"),
    Case("score: the input is missing",
         lambda w: ["score", lib_arg(w), f"--input={w.path('missing.jsonl')}", f"--output={w.path('o.jsonl')}"],
         message=r"missing.jsonl: file not found"),
    Case("score: a NaN id (not JSON)",
         lambda w: ["score", lib_arg(w), "--input=" + w.write("nan.jsonl", '{"id": NaN, "inputs": "x", "choices": ["a"]}'),
                    f"--output={w.path('o.jsonl')}"],
         message=r"nan.jsonl:1: not valid JSON \(NaN is not a JSON number\)"),
    Case("score: an id that is a list",
         lambda w: ["score", lib_arg(w), "--input=" + w.write("id.jsonl", '{"id": [1], "inputs": "x", "choices": ["a"]}'),
                    f"--output={w.path('o.jsonl')}"],
         message=r"id.jsonl:1: field 'id' must be a string or a number"),
    Case("score: --batch_size=0",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", "--batch_size=0"],
         message=r"argument --batch_size: expected a positive integer, got '0'"),
    Case("score: --batch_size=-3",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", "--batch_size=-3"],
         message=r"argument --batch_size: expected a positive integer, got '-3'"),
    Case("score: --expert_chunk=-1",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", "--expert_chunk=-1"],
         message=r"argument --expert_chunk: expected a positive integer"),
    Case("score: --max_input_length=0",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", "--max_input_length=0"],
         message=r"argument --max_input_length: expected an integer of at least 2"),
    Case("score: --max_target_length=0",
         lambda w: ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}", "--max_target_length=0"],
         message=r"argument --max_target_length: expected an integer of at least 2"),
    Case("score: a flipped byte inside an expert's tensors",
         lambda w: (w.flip_byte(), ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"])[1],
         message=r"tensors.safetensors: expert 'builtin_sentiment_is_positive': sha256 .* does not match"),
    Case("score: a flipped byte, loaded anyway with --skip_integrity_check (warns)",
         lambda w: (w.flip_byte(), ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}",
                                   "--skip_integrity_check"])[1],
         status=0, writes=("o.jsonl",)),
    Case("score: a truncated expert.json",
         lambda w: (open(os.path.join(w.library(), "experts", TASKS[1], "expert.json"), "r+").truncate(20),
                    ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"])[1],
         message=r"expert.json: expert 'builtin_topic_which_topic': 20 bytes, but the manifest records"),
    Case("score: --library is a file",
         lambda w: ["score", f"--library={w.write('libfile', 'x')}", f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"],
         message=r"libfile: is a file, not an expert library directory"),
    # ------------------------------------------------------------------ embed
    Case("embed: --output is the --input",
         lambda w: ["embed", "--input=" + w.write("t.txt", "a\nb\n"), f"--output={w.path('t.txt')}"],
         message=r"--output=.*t.txt: is also an input"),
    Case("embed: --output in a missing directory",
         lambda w: ["embed", "--input=" + w.write("t.txt", "a\n"), f"--output={w.path('no', 'x.npy')}"],
         message=r"the directory .*no does not exist"),
    Case("embed: --output is a directory",
         lambda w: ["embed", "--input=" + w.write("t.txt", "a\n"), f"--output={w.root}"],
         message=r"is a directory; expected a file name to write"),
    Case("embed: invalid UTF-8",
         lambda w: ["embed", "--input=" + w.write("t.txt", b"fine\nbad \xc3\x28\n"), f"--output={w.path('x.npy')}"],
         message=r"t.txt:2: not UTF-8 text \(byte 0xc3 at column 5\)"),
    Case("embed: --max_length=0",
         lambda w: ["embed", "--input=" + w.write("t.txt", "a\n"), f"--output={w.path('x.npy')}", "--max_length=0"],
         message=r"argument --max_length: expected an integer of at least 2"),
    # ------------------------------------------------------------------ retrieve
    Case("retrieve: --output in a missing directory, refused before any work",
         lambda w: ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", f"--output={w.path('no', 'r.json')}"],
         message=r"--output=.*r.json: the directory .*no does not exist"),
    Case("retrieve: a corrupt keys file (its recorded sha256 no longer matches)",
         lambda w: (w.write(os.path.join("lib", "retrieval", "keys", f"{TASKS[0]}.jsonl"), "{\"inputs\": \"x\"}\n{oops\n")
                    if w.library() else None,
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=bm25"])[1],
         message=r"retrieval keys of expert 'builtin_sentiment_is_positive': 22 bytes, but the manifest records"),
    Case("retrieve: a corrupt keys file with --skip_integrity_check: the line is named",
         lambda w: (w.write(os.path.join("lib", "retrieval", "keys", f"{TASKS[0]}.jsonl"), "{\"inputs\": \"x\"}\n{oops\n")
                    if w.library() else None,
                    ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=bm25",
                     "--skip_integrity_check"])[1],
         message=r"keys/builtin_sentiment_is_positive.jsonl:2: not valid JSON"),
    Case("retrieve: --top_k=0",
         lambda w: ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--top_k=0"],
         message=r"argument --top_k: expected a positive integer"),
    Case("retrieve: --num_queries=-1",
         lambda w: ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--num_queries=-1"],
         message=r"argument --num_queries: expected a positive integer"),
    # ------------------------------------------------------------------ eval
    Case("eval: --max_examples=-5 (used to evaluate 195 of 200)",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.path('ev')}", "--max_examples=-5"],
         message=r"argument --max_examples: expected a positive integer or 'all', got '-5'"),
    Case("eval: --max_examples=0",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.path('ev')}", "--max_examples=0"],
         message=r"argument --max_examples: expected a positive integer or 'all', got '0'"),
    Case("eval: --output_dir is a file, refused before any work",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.write('ev', 'x')}"],
         message=r"--output_dir=.*ev: exists and is not a directory"),
    Case("eval: --overwrite of a directory eval did not write",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={os.path.dirname(w.write('mine/thesis.tex', 'x'))}",
                    "--overwrite"],
         message=r"holds files that `elm-jax eval` did not write \(thesis.tex\)"),
    Case("eval: a flipped byte",
         lambda w: (w.flip_byte(TASKS[1]), ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.path('ev')}"])[1],
         message=r"expert 'builtin_topic_which_topic': sha256 .* does not match"),
    Case("eval: --beam_size=0",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--output_dir={w.path('ev')}", "--beam_size=0"],
         message=r"argument --beam_size: expected a positive integer"),
    # ------------------------------------------------------------------ library
    Case("library remove: a manifest directory '../victim_dir' (used to delete it)",
         lambda w: (w.write("victim_dir/precious.txt", "keep me"),
                    w.manifest(lambda m: m["experts"][TASKS[0]].update(directory="../victim_dir")),
                    ["library", "remove", lib_arg(w), TASKS[0]])[2],
         message=r"experts\['builtin_sentiment_is_positive'\].directory: '../victim_dir' is not of the form 'experts/NAME'"),
    Case("library remove: a manifest directory 'experts/../../victim_dir'",
         lambda w: (w.write("victim_dir/precious.txt", "keep me"),
                    w.manifest(lambda m: m["experts"][TASKS[0]].update(directory="experts/../../victim_dir")),
                    ["library", "remove", lib_arg(w), TASKS[0]])[2],
         message=r"'experts/../../victim_dir' is not of the form 'experts/NAME'"),
    Case("score: an expert directory that is a symlink out of the library",
         lambda w: (w.write("outside/x", "x"), shutil.rmtree(os.path.join(w.library(), "experts", TASKS[0])),
                    os.symlink(w.path("outside"), os.path.join(w.library(), "experts", TASKS[0])),
                    ["score", lib_arg(w), f"--input={w.examples()}", f"--output={w.path('o.jsonl')}"])[3],
         message=r"resolves to .*outside, outside .*lib"),
    Case("library verify: a manifest entry without 'files'",
         lambda w: (w.manifest(lambda m: m["experts"][TASKS[0]].pop("files")), ["library", "verify", lib_arg(w)])[1],
         message=r"experts\['builtin_sentiment_is_positive'\].files: expected an object"),
    Case("library list: a library path that is a file",
         lambda w: ["library", "list", f"--library={w.write('libfile', 'x')}"],
         message=r"libfile: is a file, not an expert library directory"),
    Case("library add: --name=x_y after --name=x/y",
         lambda w: (cli.main(["library", "add", lib_arg(w), "--keys=none", "--name=x/y",
                              os.path.join(w.run_dir(), "experts", TASKS[0])]),
                    ["library", "add", lib_arg(w), "--keys=none", "--name=x_y",
                     os.path.join(w.run_dir(), "experts", TASKS[1])])[1],
         message=r"expert name 'x_y' maps to the directory 'experts/x_y', which expert 'x/y' already uses"),
    Case("library add: --keys records without a string 'inputs'",
         lambda w: ["library", "add", f"--library={w.path('newlib')}", "--keys=" + w.write("k.jsonl", '{"inputs": "a"}\n{"text": "b"}\n'),
                    os.path.join(w.run_dir(), "experts", TASKS[0])],
         message=r"k.jsonl:2: field 'inputs' must be a string"),
    Case("library add: an expert named '..' via --name",
         lambda w: ["library", "add", lib_arg(w), "--keys=none", "--name=..", os.path.join(w.run_dir(), "experts", TASKS[0])],
         message=r"--name: '\.\.' is not a usable expert name"),
    Case("library add: the same run again (a resumed add) skips what is there",
         lambda w: ["library", "add", lib_arg(w), w.run_dir()],
         status=0, stdout=r"already in the library: builtin_sentiment_is_positive .*\n.*already in the library: "
                           r"builtin_topic_which_topic"),
    Case("library verify: a staged leftover of a killed add is reported",
         lambda w: (os.makedirs(os.path.join(w.library(), "experts", f".x.otherhost.123.{'a' * 32}.tmp")),
                    ["library", "verify", lib_arg(w)])[1],
         status=1, stdout=r"\.x\.otherhost\.123\.a{32}\.tmp: left by an interrupted or running `library add`"),
    # ------------------------------------------------------------------ merge
    Case("merge: --name=..",
         lambda w: ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", "--name=.."],
         message=r"'\.\.' is not a usable expert name"),
    Case("merge: --top_k=0",
         lambda w: ["merge", lib_arg(w), f"--ranking={w.write('r.json', '{}')}", "--top_k=0", "--name=m"],
         message=r"argument --top_k: expected a positive integer"),
    Case("merge: --density=1.5",
         lambda w: ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", "--method=ties", "--density=1.5", "--name=m"],
         message=r"argument --density: expected a number in \(0, 1\]"),
    Case("merge: --weights that are not numbers",
         lambda w: ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", "--method=weighted", "--weights=a,b", "--name=m"],
         message=r"--weights=a,b: expected a number, got 'a'"),
    Case("merge: a ranking file that is not JSON",
         lambda w: ["merge", lib_arg(w), f"--ranking={w.write('r.json', '{not json')}", "--top_k=1", "--name=m"],
         message=r"r.json: expected the JSON of `elm-jax retrieve --output`"),
    Case("merge: another merge under an existing expert's name",
         lambda w: ["merge", lib_arg(w), f"--experts={','.join(TASKS)}", f"--name={TASKS[0]}"],
         message=r"already holds an expert of that name \(not this merge\)"),
    # ------------------------------------------------------------------ demo
    Case("demo: --out is a file",
         lambda w: ["demo", "--budget=test", f"--out={w.write('demo_out', 'x')}", "--no_progress"],
         message=r"--out=.*demo_out: exists and is not a directory"),
    Case("demo: a truncated stage record",
         lambda w: (_demo_dir(w, stage='{"result": {"ta'), ["demo", "--budget=test", f"--out={w.path('d')}", "--no_progress"])[1],
         message=r"stages/pretrain.json: not valid JSON"),
    Case("demo: rerun with another budget",
         lambda w: (_demo_dir(w), ["demo", "--budget=quick", f"--out={w.path('d')}", "--no_progress"])[1],
         message=r"budget.json: this output was made with another budget \(.*emb_dim: 32 there, 64 now"),
    # ------------------------------------------------------------------ gin
    Case("train: a binding that does not parse",
         lambda w: train_args(w.path("model"), TASKS, "--gin.TRAIN_STEPS=[1"),
         message=r"--gin.TRAIN_STEPS=\[1: .*unbalanced"),
]


def _demo_dir(w: World, stage: Optional[str] = None) -> None:
  from elm_jax.demo import pipeline
  budget = dataclasses.asdict(pipeline.BUDGETS["test"])
  w.write("d/budget.json", json.dumps(budget, indent=1, sort_keys=True))
  if stage is not None:
    w.write("d/stages/pretrain.json", stage)
  else:
    os.makedirs(w.path("d", "stages"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)


def test_corpus_covers_every_command():
  named = {c.name.split(":")[0].split()[0] for c in CASES}
  assert named >= {"train", "score", "embed", "retrieve", "eval", "library", "merge", "demo"}
  assert len(CASES) >= 40


def test_unreadable_input_is_named(made, tmp_path, capsys, monkeypatch):
  """A file that exists but cannot be read: chmod 000 for a normal user; root reads anything,
  so there the PermissionError such a user gets is raised for that path."""
  path = tmp_path / "locked.jsonl"
  path.write_text('{"id": 0, "inputs": "x", "choices": ["a"]}\n')
  path.chmod(0)
  if os.geteuid() == 0:
    real_open = open

    def locked_open(file, *args, **kwargs):
      if os.fspath(file) == os.fspath(path):
        raise PermissionError(13, "Permission denied", os.fspath(file))
      return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", locked_open)
  status = cli.main(["score", f"--library={made / 'lib'}", f"--input={path}", f"--output={tmp_path / 'o.jsonl'}"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  assert re.search(r"--input=.*locked.jsonl: cannot be read \(Permission denied\)", err), err
  assert not (tmp_path / "o.jsonl").exists()


def test_broken_pipe_is_quiet(tmp_path):
  """`elm-jax tasks list | head -1`: the reader goes away; no BrokenPipeError traceback."""
  proc = subprocess.Popen([sys.executable, "-m", "elm_jax.commands.cli", "tasks", "list"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc.stdout.readline()
  proc.stdout.close()
  err = proc.stderr.read().decode()
  status = proc.wait(timeout=120)
  assert "Traceback" not in err and "BrokenPipe" not in err, err
  assert status in (0, 141)
