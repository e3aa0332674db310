"""Head to head with PyTorch: elm_jax against what a researcher would otherwise run, Hugging Face
transformers T5 with bottleneck adapters in PyTorch, one expert at a time.

Usage (the project's environment; the PyTorch side runs in its own):
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python bench/head_to_head.py \
      [--torch_python PATH] [--quick] [--write] [--device=cpu|cuda]

`--device=cuda` runs both sides on the GPU (JAX's GPU backend at float32 "highest" matmul
precision, PyTorch's cuda without TF32), with the same checks; default: both on the CPU.

`--torch_python` (default: $ELM_TORCH_PYTHON, else .venv-bench/bin/python) is a python with
torch and transformers, the `bench` extra of pyproject.toml, e.g.
  python3 -m venv .venv-bench && .venv-bench/bin/pip install numpy safetensors \
      torch==2.13.0 transformers==4.57.6 --extra-index-url https://download.pytorch.org/whl/cpu
`--quick` runs the whole harness on a tiny model (checks the harness, not performance: under a
minute on an idle 2-core machine); `--write` puts the report into BENCHMARKS.md, one section per
CPU model (a rerun replaces its machine's earlier report; other machines' reports stay).
Progress goes to stderr, the markdown report to stdout.

On a busy machine PyTorch's OpenMP threads spin-wait for each other whenever another process
holds a core: with 2 threads next to two busy processes, a forward pass of this model took 4.0 s
instead of 0.76 s with OMP_WAIT_POLICY=PASSIVE (or 1 thread). The worker inherits the
environment, so `OMP_WAIT_POLICY=PASSIVE` before the command applies it; the report's command
line shows it when set, and the report flags a busy machine.

Design. JAX and torch live in different environments, so the two sides are two processes:
this script (JAX) builds everything, writes it to a temporary directory, and drives
`bench/torch_side.py` as a worker over a pipe (one JSON request per line, one JSON reply):
  - the random backbone as a Hugging Face checkpoint (`hf.save_hf_checkpoint`);
  - the experts as .npz files of stacked elm_jax expert trees ({'encoder/layers_0/...': [E, ...]});
  - the examples as JSON token ids, EOS (1) already appended, exactly the ids elm_jax's
    `RankScorer` builds (it appends EOS to the input and to each choice);
  - the training batches as .npz; scores come back as .npy, timings and losses in the replies.
Both sides stay alive for the whole run, so every row is warmed up once (compilation excluded)
and the timed repeats go round-robin over the rows: a change of machine load during the run
hits every row alike. Each side times its own calls (reading files and the pipe excluded).

Workloads (T5 v1.1 layout, random weights; adapter experts of the paper's recipe):
  scoring E=8 and E=32 experts x 32 examples x 4 choices (retrieval-shaped) and E=8 x 256
  (evaluation-shaped): "PyTorch, the paper's way" (a row per (input, choice) pair), "PyTorch,
  careful" (encoder once per input), "elm_jax one pass" (`score_all_experts`, default expert
  chunk), "elm_jax one expert at a time" (expert_chunk=1);
  training E=8 experts, batch 4, inputs 64, targets 16, 10 steps: "PyTorch, one expert after
  another", "elm_jax vmapped, all 8 at once" (the jitted vmapped `train_step`), "elm_jax one
  after another" (the E=1 step, 8 times).

Before any timing, the sides must agree (else exit status 1): every score within
SCORE_TOLERANCE x max(1, |score|) of the PyTorch paper's-way score, identical argmax
predictions, and, with dropout 0, each expert's first-step training loss within
LOSS_TOLERANCE (relative). The report also gives each side's float32 error against the PyTorch
model run in float64 (a few experts and examples), which is what the tolerance has to allow.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

# Both sides on one device: the CPU (JAX forced onto it), or with --device=cuda the GPU (JAX's
# default backend there, PyTorch's cuda). Read before JAX is imported.
_EARLY = argparse.ArgumentParser(add_help=False)
_EARLY.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
DEVICE = _EARLY.parse_known_args()[0].device
if DEVICE == "cpu":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from elm_jax import expert_stack, tree_paths  # noqa: E402
from elm_jax.checkpoints import hf  # noqa: E402
from elm_jax.evaluation import rank_scoring  # noqa: E402
from elm_jax.models.adapters import ExpertConfig, split_params  # noqa: E402
from elm_jax.models.model import EncoderDecoderModel  # noqa: E402
from elm_jax.models.t5 import init_params  # noqa: E402
from elm_jax.models.t5_config import T5Config  # noqa: E402
from elm_jax.training import train_step as ts  # noqa: E402
from bench_train import compiled_flops, measure_peak_flops  # noqa: E402  (bench/ is the script's directory)

HEADING = "## Head to head with PyTorch (bench/head_to_head.py)"
# Scores are sums of up to 5 token log-probabilities, each a logit minus a log-sum-exp over the
# vocabulary, computed in float32 through 12 layers by two libraries with different kernels and
# summation orders (and XLA's CPU tanh is a few ulp off where torch's is correctly rounded).
# The random-weight model amplifies rounding: against a float64 run of the PyTorch model (the
# run reports it), PyTorch's float32 scores were off by up to 3.2e-5 of the score and elm_jax's
# by up to 5.0e-5, so the two differ by up to about 1e-4. 5e-4 of max(1, |score|) leaves room
# for that over thousands of scores and is still hundreds of times below how far the experts'
# scores are apart (reported with the check), so a wrongly mapped expert tensor fails it.
SCORE_TOLERANCE = 5e-4
# First-step training loss (dropout 0, same weights and batch): one forward pass in float32.
# Against a float64 run of the PyTorch model (also reported), the full-size model's first-step
# losses were off by up to 5.0e-6 (PyTorch) and 6.8e-6 (elm_jax), so the two may differ by about
# 1.2e-5; 3e-5 leaves room for that. Later steps are reported, not checked: Adam turns rounding
# noise in near-zero gradients into steps of the full learning rate, and the float64 run showed
# PyTorch's own float32 losses drifting 3.9e-4 from it by step 10.
LOSS_TOLERANCE = 3e-5
# A 1-minute load average above this fraction of the cores before the run marks the figures
# as taken on a busy machine.
BUSY_LOAD = 0.25
FIRST_TOKEN_ID = 3  # random ids avoid pad (0), EOS (1) and unk (2)


class HarnessError(RuntimeError):
  """The sides disagree, or the PyTorch worker failed."""


# ----------------------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True)
class Scoring:
  shape: str          # what the workload looks like in use
  experts: int
  examples: int
  choices: int = 4


@dataclasses.dataclass(frozen=True)
class Training:
  experts: int
  batch: int          # per expert
  input_length: int
  target_length: int
  steps: int
  dropout_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class Plan:
  config: T5Config
  scoring: tuple[Scoring, ...]
  training: Training
  repeats: int
  batch_size: int = 32          # scoring: examples per elm_jax / careful batch, rows per paper's batch
  max_input_tokens: int = 64    # scoring inputs, EOS included
  max_choice_tokens: int = 4    # scoring choices, EOS excluded


FULL = Plan(
    config=T5Config(vocab_size=32128, emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024,
                    num_encoder_layers=6, num_decoder_layers=6),
    scoring=(Scoring("retrieval-shaped", 8, 32), Scoring("retrieval-shaped", 32, 32),
             Scoring("evaluation-shaped", 8, 256)),
    training=Training(experts=8, batch=4, input_length=64, target_length=16, steps=10),
    repeats=3)
# The test suite's tiny shapes (tests/conftest.py): checks the harness, says nothing of speed.
QUICK = Plan(
    config=T5Config(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                    num_encoder_layers=2, num_decoder_layers=2),
    scoring=(Scoring("retrieval-shaped", 2, 8), Scoring("evaluation-shaped", 2, 20)),
    # Dropout off: its step takes 20 s to compile even for this model (on a busy 2-core CPU),
    # and the agreement check's dropout-free step is then reused by the timed rows.
    training=Training(experts=2, batch=2, input_length=16, target_length=8, steps=3, dropout_rate=0.0),
    repeats=1, batch_size=8, max_input_tokens=16)


def make_examples(plan: Plan, count: int, choices: int, seed: int) -> list[rank_scoring.Example]:
  """Random token ids (without EOS, which the scorers append): inputs of max/4 to max-1 tokens,
  `choices` distinct choices of 1 to max_choice_tokens tokens."""
  rng = np.random.default_rng(seed)
  vocab = plan.config.vocab_size
  examples = []
  for _ in range(count):
    inputs = rng.integers(FIRST_TOKEN_ID, vocab, rng.integers(plan.max_input_tokens // 4, plan.max_input_tokens)).tolist()
    options: list[list[int]] = []
    while len(options) < choices:
      option = rng.integers(FIRST_TOKEN_ID, vocab, rng.integers(1, plan.max_choice_tokens + 1)).tolist()
      if option not in options:  # equal choices would tie, and a tie has no stable argmax
        options.append(option)
    examples.append(rank_scoring.Example(inputs, options))
  return examples


def examples_with_eos(examples: list[rank_scoring.Example], eos: int) -> list[dict]:
  """The ids the torch side scores: exactly those RankScorer builds (input + EOS, choice + EOS)."""
  return [{"inputs": ex.inputs + [eos], "choices": [c + [eos] for c in ex.choices]} for ex in examples]


def make_training_batches(config: T5Config, t: Training, seed: int) -> dict[str, np.ndarray]:
  """[E, steps, B, L] int32: inputs of L/2 to L tokens and targets of L/4 to L tokens, each
  ending in EOS, 0-padded; decoder inputs are the targets shifted right after the start id."""
  rng = np.random.default_rng(seed)
  lead = (t.experts, t.steps, t.batch)

  def rows(length: int, shortest: int) -> np.ndarray:
    ids = rng.integers(FIRST_TOKEN_ID, config.vocab_size, lead + (length,))
    lengths = rng.integers(shortest, length + 1, lead + (1,))
    position = np.arange(length)
    ids = np.where(position < lengths - 1, ids, np.where(position == lengths - 1, config.eos_id, 0))
    return ids.astype(np.int32)

  targets = rows(t.target_length, max(2, t.target_length // 4))
  start = np.full(lead + (1,), config.decoder_start_id, np.int32)
  return {"encoder_input_tokens": rows(t.input_length, t.input_length // 2),
          "decoder_input_tokens": np.concatenate([start, targets[..., :-1]], axis=-1),
          "decoder_target_tokens": targets}


def initial_experts(config: T5Config, expert_config: ExpertConfig, pretrained: dict, seeds) -> dict:
  """Experts as training starts them, stacked [len(seeds), ...]: the expert part of
  `split_params(init_params(config, key, expert=...))` drawn from each seed, layer-norm scales
  from the backbone (as `trainer.initial_experts`, which would import TensorFlow: 5 s)."""
  draw = jax.jit(lambda key: split_params(nn.unbox(init_params(config, key, expert=expert_config)),
                                          expert_config)[1])
  backbone = tree_paths.flatten(pretrained)
  trees = []
  for seed in seeds:
    flat = tree_paths.flatten(jax.device_get(draw(jax.random.PRNGKey(seed))))
    trees.append({p: np.asarray(backbone.get(p, v), np.float32) for p, v in flat.items()})
  return tree_paths.unflatten({p: np.stack([t[p] for t in trees]) for p in trees[0]})


def scoring_experts(config: T5Config, expert_config: ExpertConfig, pretrained: dict, count: int,
                    seed: int) -> dict:
  """[count, ...] experts that look trained: the paper's initialisation (a draw per expert) moved
  by random noise, adapter biases and layer-norm scales included, so experts differ from each
  other and every tensor the torch side maps matters to the scores."""
  stacked = initial_experts(config, expert_config, pretrained, range(seed, seed + count))
  rng = np.random.default_rng(seed)
  flat = tree_paths.flatten(stacked)
  for path, value in flat.items():
    noise = 0.1 if path[-1] == "scale" else 0.02
    flat[path] = (np.asarray(value) + rng.normal(0.0, noise, value.shape)).astype(np.float32)
  return tree_paths.unflatten(flat)


def save_stacked(path: pathlib.Path, stacked: dict) -> str:
  np.savez(path, **{tree_paths.join(p): np.asarray(v, np.float32)
                    for p, v in tree_paths.flatten(stacked).items()})
  return str(path)


# ------------------------------------------------------------------------- the torch worker
class TorchWorker:
  """`bench/torch_side.py serve` in the torch environment; `request` sends one JSON request
  and returns the reply, raising HarnessError with the worker's traceback if it failed."""

  def __init__(self, python: str, workdir: pathlib.Path):
    self.log_path = workdir / "torch_side.log"
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen([python, str(REPO / "bench" / "torch_side.py"), "serve"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                 text=True, cwd=REPO)

  def request(self, **request) -> dict:
    try:
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except BrokenPipeError:
      line = ""
    if not line:
      self._log.flush()
      tail = self.log_path.read_text()[-3000:]
      raise HarnessError(f"the PyTorch worker exited (status {self.proc.poll()}); its log ends:\n{tail}")
    reply = json.loads(line)
    if not reply.pop("ok"):
      raise HarnessError(f"the PyTorch worker failed on {request['op']}:\n{reply['error']}")
    return reply

  def close(self) -> None:
    if self.proc.stdin and not self.proc.stdin.closed:
      self.proc.stdin.close()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self._log.close()


# ---------------------------------------------------------------------------- the JAX side
def jax_scores(model, backbone, experts, examples, batch_size: int, chunk: Optional[int]) -> np.ndarray:
  """`score_all_experts` -> [E, N, C]; refuses a run that truncated anything."""
  scores, _, scorer = rank_scoring.score_all_experts(model, backbone, experts, examples,
                                                     batch_size=batch_size, expert_chunk=chunk)
  if scorer.truncated.inputs or scorer.truncated.choices:
    raise HarnessError("elm_jax truncated inputs or choices; the sides would score different ids")
  return scores


class JaxTrainer:
  """The jitted vmapped `train_step` with the paper's optimizer over `steps` steps."""

  def __init__(self, config: T5Config, expert_config: ExpertConfig, steps: int, dropout_rate: float):
    model = EncoderDecoderModel.build(config.replace(dropout_rate=dropout_rate), expert_config)
    self.optimizer = ts.make_optimizer(ts.OptimizerConfig(), total_steps=steps)
    rng = jax.random.PRNGKey(0) if dropout_rate > 0 else None
    self.step = jax.jit(functools.partial(ts.train_step, model=model, optimizer=self.optimizer,
                                          dropout_rng=rng))
    self.steps = steps

  def run(self, backbone, inits: dict, batches: dict[str, np.ndarray], group: int) -> np.ndarray:
    """Trains the experts of `inits` ([E, ...]) `group` at a time -> losses [E, steps]."""
    total = expert_stack.num_experts(inits)
    losses = []
    for first in range(0, total, group):
      state = ts.init_train_state(expert_stack.take(inits, range(first, first + group)), self.optimizer)
      group_losses = []
      for step in range(self.steps):
        state, metrics = self.step(state, backbone, {k: v[first:first + group, step] for k, v in batches.items()})
        group_losses.append(metrics["loss"])
      jax.block_until_ready(state)
      losses.append(np.stack([np.asarray(x) for x in group_losses], axis=1))
    return np.concatenate(losses, axis=0)


# ------------------------------------------------------------------------------- checking
def compare_scores(label: str, reference: np.ndarray, other: np.ndarray) -> dict:
  """Scores [E, N, C] of `other` against the reference: the largest |difference| /
  max(1, |reference|), and how many argmax predictions differ. A prediction may differ only in a
  near-tie, where the reference's top two are within twice the tolerance (each score may move
  by the tolerance, so the order of such a pair is not defined at this precision)."""
  scale = np.maximum(1.0, np.abs(reference))
  missing = np.isneginf(reference) & np.isneginf(other)  # examples with fewer choices
  relative = np.where(missing, 0.0, np.abs(other - reference) / scale)
  top_two = np.sort(reference, axis=-1)[..., -2:]
  near_tie = (top_two[..., 1] - top_two[..., 0]) <= 2 * SCORE_TOLERANCE * scale.max(axis=-1)
  differ = np.argmax(reference, -1) != np.argmax(other, -1)
  result = {"label": label, "worst": float(np.max(relative)), "argmax_differ": int(differ.sum()),
            "near_ties": int(near_tie.sum())}
  if not result["worst"] <= SCORE_TOLERANCE or np.any(differ & ~near_tie):
    raise HarnessError(f"{label}: scores differ from PyTorch's by up to {result['worst']:.2e} of "
                       f"max(1, |score|) (tolerance {SCORE_TOLERANCE:g}); {int(np.sum(differ & ~near_tie))} "
                       "argmax prediction(s) differ outside near-ties")
  return result


def expert_spread(scores: np.ndarray) -> float:
  """How far the experts' scores are apart: the smallest, over experts e > 0, of the largest
  |score_e - score_0| / max(1, |score_0|). A check tolerance far below it can tell experts apart."""
  scale = np.maximum(1.0, np.abs(scores[0]))
  return float(min(np.max(np.abs(scores[e] - scores[0]) / scale) for e in range(1, len(scores))))


# -------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Row:
  name: str
  run: Callable[[], float]      # one timed run -> seconds
  times: list[float] = dataclasses.field(default_factory=list)

  @property
  def best(self) -> float:
    return min(self.times)

  @property
  def spread(self) -> float:
    return max(self.times) - min(self.times)


def clock(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_rows(rows: list[Row], repeats: int, log: Callable[[str], None]) -> None:
  """Repeats round-robin over the rows (each already warmed up)."""
  for _ in range(repeats):
    for row in rows:
      row.times.append(row.run())
      log(f"  {row.name}: {row.times[-1]:.3f} s")


# -------------------------------------------------------------------------------- report
def machine() -> str:
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores"


def command_line() -> str:
  env = " ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS", "OMP_NUM_THREADS",
                                                  "OMP_WAIT_POLICY") if k in os.environ)
  return f"{env} {shlex.join([sys.executable] + sys.argv)}".strip()


def write_section(path: pathlib.Path, section: str, family: str = HEADING) -> None:
  """Puts `section` into BENCHMARKS.md: one section per machine, so that a run on another CPU adds its
  own report instead of erasing the others. It replaces the section with the same heading (the same
  machine, up to the next `## `), else goes after the last section whose heading starts with
  `family` (default: the head-to-head sections), else at the end."""
  lines = path.read_text().splitlines() if path.exists() else []
  new = section.rstrip("\n").splitlines()
  heading = new[0]
  ours = [i for i, line in enumerate(lines) if line.startswith(family)]
  start = next((i for i in ours if lines[i] == heading), None)

  def section_end(i: int) -> int:
    return next((j for j in range(i + 1, len(lines)) if lines[j].startswith("## ")), len(lines))

  if start is not None:
    end = section_end(start)
    lines[start:end] = new + ([""] if end < len(lines) else [])
  elif ours:
    end = section_end(ours[-1])
    lines[end:end] = ([""] if lines[end - 1].strip() else []) + new + ([""] if end < len(lines) else [])
  else:
    lines += ([""] if lines and lines[-1].strip() else []) + new
  path.write_text("\n".join(lines) + "\n")


def ratio(row: Row, reference: Row) -> str:
  return f"{row.best / reference.best:.2f}"


# ---------------------------------------------------------------------------------- main
def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch_python", default=os.environ.get("ELM_TORCH_PYTHON", ".venv-bench/bin/python"),
                      help="python with torch and transformers (default: $ELM_TORCH_PYTHON or .venv-bench/bin/python)")
  parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat: checks the harness end to end")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where both sides run: the CPU, or a CUDA GPU (JAX's GPU backend, PyTorch's cuda)")
  parser.add_argument("--write", action="store_true", help="put the report into BENCHMARKS.md")
  args = parser.parse_args()
  load_before = os.getloadavg()
  started = datetime.datetime.now().astimezone()
  torch_python = args.torch_python if os.path.isabs(args.torch_python) else str(REPO / args.torch_python)
  if not os.path.isfile(torch_python):
    print(f"error: {args.torch_python}: no such python; pass --torch_python (see --help for the "
          "environment it needs)", file=sys.stderr)
    return 2
  if args.device == "cuda":
    if jax.default_backend() != "gpu":
      print(f"error: --device=cuda: JAX's backend here is {jax.default_backend()!r}, not 'gpu'", file=sys.stderr)
      return 2
    # float32 as PyTorch computes it on the GPU (no TF32 unless asked): like for like.
    jax.config.update("jax_default_matmul_precision", "highest")
  plan = QUICK if args.quick else FULL
  config, expert_config = plan.config, ExpertConfig()
  clock_start = time.perf_counter()

  def log(message: str) -> None:
    print(f"[{time.perf_counter() - clock_start:6.1f} s] {message}", file=sys.stderr, flush=True)

  with tempfile.TemporaryDirectory(prefix="head_to_head_") as tmp:
    work = pathlib.Path(tmp)
    worker = TorchWorker(torch_python, work)
    try:
      # ---------------------------------------------------------------- shared inputs
      log("building the random backbone, experts and data ...")
      pretrained = jax.device_get(jax.jit(lambda key: nn.unbox(init_params(config, key)))(jax.random.PRNGKey(0)))
      hf.save_hf_checkpoint(pretrained, config, work / "hf")
      versions = worker.request(op="setup", hf_dir=str(work / "hf"), device=args.device)
      most = max(s.experts for s in plan.scoring)
      backbone, _ = split_params(pretrained, expert_config)
      backbone = jax.device_put(backbone)  # on the device once, as the torch model is loaded once
      experts = scoring_experts(config, expert_config, pretrained, most, seed=1)
      experts_file = save_stacked(work / "experts.npz", experts)
      model = EncoderDecoderModel.build(config, expert_config)

      # -------------------------------------------------------------------- scoring
      scoring_results = []
      for k, workload in enumerate(plan.scoring):
        log(f"scoring: {workload.experts} experts x {workload.examples} examples x {workload.choices} choices")
        examples = make_examples(plan, workload.examples, workload.choices, seed=100 + workload.examples)
        examples_file = work / f"examples_{k}.json"
        examples_file.write_text(json.dumps(examples_with_eos(examples, config.eos_id)))
        chosen = expert_stack.take(experts, range(workload.experts))

        def torch_row(way, save=None, w=workload, f=examples_file, float64=False, num_experts=None):
          return worker.request(op="score", way=way, experts=experts_file, num_experts=num_experts or w.experts,
                                examples=str(f), batch_size=plan.batch_size, save=save,
                                float64=float64)["seconds"]

        def jax_row(chunk, chosen=chosen, examples=examples):
          return clock(lambda: jax_scores(model, backbone, chosen, examples, plan.batch_size, chunk))

        # Warm-up runs (compilation on the JAX side), which also give the scores to check.
        scores = {}
        for way in ("paper", "careful"):
          torch_row(way, save=str(work / f"{way}_{k}.npy"))
          scores[way] = np.load(work / f"{way}_{k}.npy")
        scores["one pass"] = jax_scores(model, backbone, chosen, examples, plan.batch_size, None)
        scores["one at a time"] = jax_scores(model, backbone, chosen, examples, plan.batch_size, 1)
        checks = [compare_scores(f"{label} vs PyTorch, the paper's way", scores["paper"], scores[key])
                  for label, key in (("PyTorch, careful", "careful"), ("elm_jax one pass", "one pass"),
                                     ("elm_jax one expert at a time", "one at a time"))]
        spread = expert_spread(scores["paper"])
        if k == 0:  # how far float32 is from float64 on each side: what the tolerance must allow
          few = min(2, workload.experts)
          torch_row("paper", save=str(work / "float64.npy"), float64=True, num_experts=few)
          exact = np.load(work / "float64.npy")
          rounding = {label: float(np.max(np.abs(scores[key][:few] - exact) / np.maximum(1.0, np.abs(exact))))
                      for label, key in (("PyTorch, the paper's way", "paper"), ("PyTorch, careful", "careful"),
                                         ("elm_jax one pass", "one pass"))}
          rounding_scope = f"{few} experts x {workload.examples} examples"
          log("  float32 vs float64: " + ", ".join(f"{n} {v:.1e}" for n, v in rounding.items()))
        log(f"  agree: worst relative difference {max(c['worst'] for c in checks):.2e}; experts apart by >= {spread:.2e}")
        rows = [Row("PyTorch, the paper's way", lambda: torch_row("paper")),
                Row("PyTorch, careful", lambda: torch_row("careful")),
                Row("elm_jax one pass", lambda: jax_row(None)),
                Row("elm_jax one expert at a time", lambda: jax_row(1))]
        time_rows(rows, plan.repeats, log)
        scoring_results.append((workload, rows, checks, spread))

      # ------------------------------------------------------------------- training
      t = plan.training
      log(f"training: {t.experts} experts, batch {t.batch}, {t.input_length}+{t.target_length} tokens, {t.steps} steps")
      # Every expert starts from the same draw, as in the paper's runs (seed 42).
      inits = initial_experts(config, expert_config, pretrained, [42] * t.experts)
      inits_file = save_stacked(work / "inits.npz", inits)
      batches = make_training_batches(config, t, seed=7)
      batches_file = work / "batches.npz"
      np.savez(batches_file, **{k: v for k, v in batches.items() if k != "decoder_input_tokens"})

      def torch_train(dropout_rate, float64=False, num_experts=None):
        return worker.request(op="train", experts=inits_file, num_experts=num_experts or t.experts,
                              batches=str(batches_file), steps=t.steps, dropout_rate=dropout_rate,
                              float64=float64)

      # Agreement with dropout off: same weights, same batches, so the same losses.
      torch_losses = np.asarray(torch_train(0.0)["losses"])
      checker = JaxTrainer(config, expert_config, t.steps, 0.0)
      jax_losses = checker.run(backbone, inits, batches, t.experts)
      first = np.abs(jax_losses[:, 0] - torch_losses[:, 0]) / np.abs(torch_losses[:, 0])
      every = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
      if not first.max() <= LOSS_TOLERANCE:
        raise HarnessError(f"training: first-step losses differ by up to {first.max():.2e} (relative; "
                           f"tolerance {LOSS_TOLERANCE:g}): elm_jax {jax_losses[:, 0]}, PyTorch {torch_losses[:, 0]}")
      log(f"  agree: first-step loss {first.max():.2e}, any step {every.max():.2e} (relative)")
      # How far float32 is from float64 on each side (the first 2 experts; float64 is slow).
      few = min(2, t.experts)
      exact = np.asarray(torch_train(0.0, float64=True, num_experts=few)["losses"])
      loss_rounding = {name: (float(np.max(np.abs(losses[:few, 0] - exact[:, 0]) / np.abs(exact[:, 0]))),
                              float(np.max(np.abs(losses[:few] - exact) / np.abs(exact))))
                       for name, losses in (("PyTorch", torch_losses), ("elm_jax", jax_losses))}
      log("  float32 vs float64 (first step, any step): " +
          ", ".join(f"{n} {a:.1e}, {b:.1e}" for n, (a, b) in loss_rounding.items()))
      trainer = checker if t.dropout_rate == 0 else JaxTrainer(config, expert_config, t.steps, t.dropout_rate)
      train_rows = [
          Row("PyTorch, one expert after another", lambda: torch_train(t.dropout_rate)["seconds"]),
          Row(f"elm_jax vmapped, all {t.experts} at once",
              lambda: clock(lambda: trainer.run(backbone, inits, batches, t.experts))),
          Row("elm_jax one after another", lambda: clock(lambda: trainer.run(backbone, inits, batches, 1)))]
      for row in train_rows:  # warm-up: compiles the E and the 1-expert step
        row.run()
      time_rows(train_rows, plan.repeats, log)
      # The ceiling: the vmapped step's FLOPs (XLA's count) at the float32 matmul peak of this run.
      step_args = (ts.init_train_state(inits, trainer.optimizer), backbone,
                   {k: v[:, 0] for k, v in batches.items()})
      ceiling = {"flops": compiled_flops(trainer.step, *step_args), "peak": measure_peak_flops()}
      log(f"  {ceiling['flops'] / 1e9:.0f} GFLOP per vmapped step; float32 matmul peak {ceiling['peak'] / 1e9:.0f} GFLOP/s")
    finally:
      worker.close()

  loads = (load_before, os.getloadavg())
  report = render(plan, args, started, loads, versions, scoring_results, (rounding, rounding_scope), train_rows,
                  ceiling, {"first": float(first.max()), "every": float(every.max()),
                   "loss": float(torch_losses[:, 0].mean()), "rounding": loss_rounding, "few": few})
  print(report)
  if args.write:
    write_section(REPO / "BENCHMARKS.md", report)
    log("written to BENCHMARKS.md")
  return 0


def render(plan: Plan, args, started, loads, versions, scoring_results, rounding, train_rows, ceiling,
           loss_check) -> str:
  c, t = plan.config, plan.training
  repeats = f"best and spread (max - min) of {plan.repeats} timed repeat(s)"
  out = [f"{HEADING}: {machine()}{' (--quick)' if args.quick else ''}", ""]
  if args.quick:
    out += ["**--quick: tiny model, harness check only; these figures say nothing about speed.**", ""]
  out += [
      f"Command: `{command_line()}`",
      "",
      f"Date: {started:%Y-%m-%d %H:%M %Z}. Machine: {machine()}; load average (1 / 5 / 15 min) "
      f"{' / '.join(f'{x:.2f}' for x in loads[0])} before the run, "
      f"{' / '.join(f'{x:.2f}' for x in loads[1])} after it. "
      f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), torch {versions['torch']} "
      f"({versions['device']}, {versions['threads']} CPU threads, denormals flushed), transformers "
      f"{versions['transformers']}; float32.",
      ""]
  if loads[0][0] > BUSY_LOAD * (os.cpu_count() or 1):
    out += [f"**The machine was busy before the run (load {loads[0][0]:.2f} on {os.cpu_count()} cores): "
            "these figures are not final.** PyTorch suffers most unless OMP_WAIT_POLICY=PASSIVE: its "
            "OpenMP threads spin-wait for each other when another process holds a core (next to two busy "
            "processes on a 2-core machine, a forward pass of this model took 4.0 s with 2 threads instead "
            "of 0.76 s with PASSIVE).", ""]
  out += [
      f"Model: T5 v1.1 layout with random weights (gated-GELU feed-forward, untied output layer, "
      f"{c.relative_attention_num_buckets} relative-position buckets up to distance "
      f"{c.relative_attention_max_distance}, RMS layer norms), d_model {c.emb_dim}, {c.num_heads} heads x "
      f"{c.head_dim}, d_ff {c.mlp_dim}, {c.num_encoder_layers}+{c.num_decoder_layers} layers, vocabulary "
      f"{c.vocab_size}. Experts: the paper's bottleneck adapters (d_model/32) after every self-attention "
      "and feed-forward output, plus every layer-norm scale; the same backbone, expert weights and token "
      "ids on both sides (PyTorch: `bench/torch_side.py`, Hugging Face `T5ForConditionalGeneration` with "
      "the adapters hooked in).",
      "",
      f"Timing: every row ran once untimed first (JAX compilation excluded), then {repeats}, round-robin "
      "over the rows; times in seconds; \"x one pass\" / \"x vmapped\" is the row's best time over elm_jax's, "
      "from this same run (above 1: elm_jax is faster). Excluded everywhere: tokenization, reading files, "
      "loading the backbone (the torch model is built and the JAX backbone put on the device once).",
      "",
      "### Rank-classification scoring",
      "",
      f"Random ids: inputs {plan.max_input_tokens // 4 + 1}-{plan.max_input_tokens} tokens, choices 1-{plan.max_choice_tokens} tokens, "
      "both with EOS; distinct choices per example. Score = sum of the log-softmax of the choice's "
      "tokens, EOS included.",
      "",
      "| workload | experts x examples x choices | way | best (s) | spread (s) | choices/s | x one pass |",
      "|---|---|---|---|---|---|---|"]
  for workload, rows, _, _ in scoring_results:
    reference = rows[2]
    total = workload.experts * workload.examples * workload.choices
    for row in rows:
      out.append(f"| {workload.shape} | {workload.experts} x {workload.examples} x {workload.choices} | {row.name} | "
                 f"{row.best:.3f} | {row.spread:.3f} | {total / row.best:.0f} | {ratio(row, reference)} |")
  out += ["", "Agreement (checked before timing; reference: PyTorch, the paper's way): largest |difference| "
          f"/ max(1, |score|) for each other way (tolerance {SCORE_TOLERANCE:g}); argmax predictions that "
          "differ, over the three ways (allowed only in near-ties: (expert, example) pairs whose top two "
          "scores are within twice the tolerance); experts' own spread (smallest over "
          "experts e of the largest relative difference from expert 0), which the tolerance must be far "
          "below to catch a wrongly loaded expert.", "",
          "| workload | careful | elm_jax one pass | elm_jax one at a time | argmax differ | near-ties | experts apart by |",
          "|---|---|---|---|---|---|---|"]
  for workload, _, checks, spread in scoring_results:
    out.append(f"| {workload.experts} x {workload.examples} | " + " | ".join(f"{x['worst']:.1e}" for x in checks) +
               f" | {sum(x['argmax_differ'] for x in checks)} | {checks[0]['near_ties']} | {spread:.1e} |")
  errors, scope = rounding
  out += ["", f"Float32 rounding on each side: against the PyTorch model run in float64 ({scope} of the "
          "first workload), the largest |difference| / max(1, |score|) was "
          + ", ".join(f"{v:.1e} ({n})" for n, v in errors.items()) + ".",
          "",
          "What each row measures:",
          f"- PyTorch, the paper's way (`score_paper_way`): per expert, copy it into the model (timed), then "
          f"one row per (input, choice) pair, {plan.batch_size} rows per forward pass, inputs padded to the "
          "batch's longest, labels padded with -100; `model(input_ids, attention_mask, labels)` as the paper's "
          "`verbalizer_compute_loss` (Hugging Face's loss and KV cache come with it), log-softmax, sums. "
          "Host-side padding timed.",
          f"- PyTorch, careful (`score_careful`): per expert, per batch of {plan.batch_size} inputs, the encoder "
          "once, its output repeated for each input's choices, the decoder once on the batch's choices padded to "
          "the longest (no cache, no loss), target logit minus log-sum-exp. Examples in their given order.",
          f"- elm_jax one pass: `rank_scoring.score_all_experts(model, backbone, experts, examples, "
          f"batch_size={plan.batch_size})`, experts stacked [E, ...] and scored vmapped, the default expert "
          "chunk (2 on CPU); includes length sorting, padding to its buckets (inputs of very different lengths "
          "packed two to an encoder row; only the choices' real tokens through the output projection) and "
          "moving each expert chunk to the device; excludes compilation.",
          "- elm_jax one expert at a time: the same call with `expert_chunk=1`.",
          "",
          "### Expert training",
          "",
          f"{t.experts} experts, batch {t.batch} each, inputs {t.input_length} tokens ({t.input_length // 2}-"
          f"{t.input_length} real), targets {t.target_length} ({max(2, t.target_length // 4)}-{t.target_length} real), "
          f"{t.steps} steps from the paper's initialisation; AdamW (0.9, 0.999, eps 1e-8, no weight decay), "
          f"lr 1e-4 decayed linearly to 0, gradient norm clipped to 1.0, dropout {t.dropout_rate:g}; loss = token-mean "
          "cross-entropy over non-padding targets.",
          "",
          "| workload | way | best (s) | spread (s) | target tokens/s | x vmapped |",
          "|---|---|---|---|---|---|"]
  tokens = t.experts * t.steps * t.batch * t.target_length
  for row in train_rows:
    out.append(f"| {t.experts} experts x {t.steps} steps | {row.name} | {row.best:.3f} | {row.spread:.3f} | "
               f"{tokens / row.best:.0f} | {ratio(row, train_rows[1])} |")
  fastest = t.steps * ceiling["flops"] / ceiling["peak"]
  out += ["",
          f"The ceiling: XLA counts {ceiling['flops'] / 1e9:.3g} GFLOP per vmapped step (the forward pass and "
          "the activation gradients; no weight gradients for the frozen backbone, as on the PyTorch side). At "
          f"the float32 matmul peak measured in this run ({ceiling['peak'] / 1e9:.0f} GFLOP/s, a 1024^3 "
          f"product) the {t.steps} steps would take {fastest:.1f} s: the vmapped row ran at "
          f"{fastest / train_rows[1].best:.0%} of that peak, and no implementation doing these FLOPs could beat "
          f"PyTorch's row by more than {train_rows[0].best / fastest:.2f}x on this machine.",
          "",
          f"Agreement (dropout 0, checked before timing): elm_jax's first-step losses (mean "
          f"{loss_check['loss']:.3f}) within {loss_check['first']:.1e} relative of PyTorch's (tolerance "
          f"{LOSS_TOLERANCE:g}); over all {t.steps} steps within {loss_check['every']:.1e} (not checked: Adam "
          "turns rounding noise in near-zero gradients into whole steps). Float32 rounding on each side, "
          f"against the PyTorch model trained in float64 (first {loss_check['few']} experts): "
          + "; ".join(f"{n} {a:.1e} at the first step, {b:.1e} at any step"
                      for n, (a, b) in loss_check["rounding"].items()) + ".",
          "",
          "What each row measures:",
          "- PyTorch, one expert after another (`train_sequential`): per expert, copy its initial tree in, "
          "freeze all but the adapters and layer norms, a new AdamW and LambdaLR, then per step "
          "`model(input_ids, attention_mask, labels).loss`, backward, `clip_grad_norm_`, step, `loss.item()`.",
          f"- elm_jax vmapped: `jax.jit(train_step)` over the {t.experts} experts stacked [E, ...], one program "
          "per step; includes the optimizer-state init and each step's batch transfer; excludes compilation.",
          "- elm_jax one after another: the same step compiled for one expert, run for each expert in turn.",
          "- Dropout is the same on both sides: every element at every site (embeddings, sub-layer outputs, "
          "feed-forward hidden, attention probabilities, final layer norms), as Hugging Face's T5 and the "
          "paper; elm_jax's masks take two 16-bit draws from each 32-bit threefry word (drop rate 0.1 is "
          "0.100006).",
          "- Not measured: mixed precision (both sides float32), and the paper's collator padding each batch "
          "to its longest input (both sides take the same fixed-length batches)."]
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  # Killed: leave through the `finally`s (the worker is stopped, the temporary directory removed).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    sys.exit(main())
  except HarnessError as e:
    print(f"FAILED: {e}", file=sys.stderr)
    sys.exit(1)
