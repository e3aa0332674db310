"""The sweep in `elm-jax plan`: what evaluating a library on a task or mixture costs on a pod.

For `num_experts` experts and a list of tasks (each: its examples and its answer choices per
example), `plan_sweep`

* cuts the sweep's units as `evaluation.sweep.plan_units` cuts them for `unit_experts`;
* counts the scores (examples x choices x experts) and the work `eval` does for them: each
  task's rows (an example of more than `MAX_CHOICES_PER_ROW` choices takes several), its batches
  of `batch_size` rows, and for each unit its passes of one expert chunk (the last one padded);
* picks the mesh and the expert chunk as `placement.choose` picks them for these devices and
  experts (`auto_mesh`; `experts_per_device` with the chip's memory in place of the device's),
  unless they are given;
* compiles the one-pass scorer (`planning.plan_scoring`) for that chunk at each choice count the
  tasks pad to (`RankScorer` pads a batch's choices to a power of two) and reads its per-device
  memory and FLOPs per batch;
* multiplies: FLOPs per device = the sum over units, their passes and their task's batches of
  the compiled FLOPs per batch (a unit whose chunk is smaller than the chunk compiled does the
  same program on fewer experts a device: its FLOPs are scaled by that ratio, which holds
  because the scorer vmaps one expert's program), and the time they take at the chip's peak.

Every batch is planned at the full lengths (`input_length` / `target_length`; eval's defaults
512/128), so the FLOPs and the time are upper bounds: `eval` pads each batch only to its longest
input and choice on `batching.cost_bucket`'s ladder, and the paper's inputs are mostly far
shorter than 512 tokens.

`paper_sweep()` is the paper's full evaluation: 296 prompt experts on the validation splits of
the 113 held-out prompts at their published sizes and on the 13 BIG-bench tasks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from typing import Optional, Sequence

import jax

from elm_jax import batching, partitioning, planning
from elm_jax.evaluation import placement, rank_scoring, sweep
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5_config import T5Config
from tasks import inventory

# The most experts a planned library may have (the plan lists their names to cut the units).
MAX_SWEEP_EXPERTS = 1_000_000

# The paper's held-out datasets: (examples in the validation split, answer choices), by the
# inventory's `dataset`. Sizes checked against the Hugging Face dataset cards: ANLI dev_r1/r2/r3
# 1000/1000/1200 (facebook/anli, and P3's anli_*_r1/r2/r3 validation), CB 56, RTE 277, WiC
# 638, COPA 100 (P3's super_glue_cb_*, super_glue_rte_GPT_3_style, super_glue_wic_GPT_3_prompt,
# super_glue_copa_best_option/exercise/choose validation), WSC.fixed 104 (coref-data/
# superglue_wsc_raw), WinoGrande XL 1267 (allenai/winogrande), HellaSwag 10042 (the TFDS
# catalog of huggingface:hellaswag), Story Cloze 2016 1871 (LSDSem/story_cloze; ELM ships the
# same 1,871-row CSV). Choice counts: P3's `_score_eval` subsets hold one row per choice, which
# confirms RTE (554 = 277 x 2), CB (168 = 56 x 3), COPA (200 = 100 x 2) and ANLI (r3: 3600 =
# 1200 x 3); WinoGrande (option1/option2), Story Cloze (sentence_quiz1/2), WiC and WSC (binary
# labels) from their cards' fields; HellaSwag's four endings from its definition. All 8 COPA
# prompts of the 113 apply to every example (none is one of P3's cause- or effect-only ones).
PAPER_VALIDATION = {
    "anli_r1": (1000, 3), "anli_r2": (1000, 3), "anli_r3": (1200, 3),
    "super_glue_cb": (56, 3), "super_glue_rte": (277, 2), "super_glue_wic": (638, 2),
    "super_glue_wsc.fixed": (104, 2), "super_glue_copa": (100, 2), "winogrande": (1267, 2),
    "hellaswag": (10042, 4), "story_cloze": (1871, 2),
}
PAPER_EXPERTS = 296
# The 13 BIG-bench tasks: every example of the task's task.json (sub-tasks summed), as the
# `default` split of Hugging Face's `bigbench` dataset counts them (the TFDS community catalog,
# tensorflow/docs-l10n site/*/datasets/community_catalog/huggingface/bigbench.md). The
# google/BIG-bench repository itself was not reachable to count them. Their answer-choice counts
# were not found in any source, so they are None (not planned) until given with --sweep_counts;
# nor was the size of conceptual_combinations' `homonyms` sub-task, which ELM lists twice
# (`tasks/mixtures.py`): its second copy is not counted.
BIGBENCH_EXAMPLES = {
    "code_line_description": 60, "conceptual_combinations": 103,
    "formal_fallacies_syllogisms_negation": 14200, "hindu_knowledge": 175, "known_unknowns": 46,
    "language_identification": 10000, "logic_grid_puzzle": 1000, "logical_deduction": 1500,
    "misconceptions": 219, "movie_dialog_same_or_different": 50000, "strategyqa": 2289,
    "vitaminc_fact_verification": 54668, "winowhy": 2862,
}


class SweepPlanError(planning.PlanError):
  """Sweep counts that cannot be read, or a sweep that cannot be planned as asked."""


@dataclasses.dataclass(frozen=True)
class SweepTask:
  """One task of a sweep: its examples and the most answer choices of any example (None: not
  known, or a generation task: not planned); `rows` when known exactly (from the data), else
  examples x the rows one example takes."""
  name: str
  examples: int
  choices: Optional[int]
  rows: Optional[int] = None
  note: str = ""

  @property
  def planned(self) -> bool:
    return self.choices is not None

  @property
  def score_rows(self) -> int:
    """Rows of the scorer's batches: MAX_CHOICES_PER_ROW choices at most a row."""
    if self.rows is not None:
      return self.rows
    return self.examples * -(-self.choices // rank_scoring.MAX_CHOICES_PER_ROW)

  @property
  def choice_bucket(self) -> int:
    """The choices a batch of this task pads to (as `RankScorer._pad_batch` pads them)."""
    return batching.bucket(min(self.choices, rank_scoring.MAX_CHOICES_PER_ROW), 2)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """What to plan: the tasks, the library's size, the unit size and the scoring shapes."""
  title: str
  tasks: tuple[SweepTask, ...]
  num_experts: int
  unit_experts: Optional[int] = None
  batch_size: int = 32
  input_length: int = 512
  target_length: int = 128
  notes: tuple[str, ...] = ()


@dataclasses.dataclass
class SweepPlan:
  """The planned sweep: its units, counts, placement, compiled scorer programs (by the choice
  count they pad to) and FLOPs."""
  units: int
  unit_sizes: list[int]             # experts of each unit of one task
  examples: int
  scores: int                       # examples x choices x experts, of the planned tasks
  batches: dict[str, int]           # task -> batches of one expert pass
  mesh: dict[str, int]
  chunk: int
  chunk_reason: str
  programs: dict[int, planning.ProgramPlan]
  flops_per_device: float
  flops_total: float
  seconds_at_peak: Optional[float]
  unplanned: list[SweepTask]


# ---------------------------------------------------------------------------- the tasks
def paper_sweep(batch_size: int = 32, input_length: int = 512, target_length: int = 128,
                unit_experts: Optional[int] = None, num_experts: int = PAPER_EXPERTS) -> SweepSpec:
  """The paper's full evaluation: `num_experts` (the paper: PAPER_EXPERTS) experts on the 113
  original-task held-out prompts (each at its dataset's validation size) and the 13 BIG-bench
  tasks."""
  inv = inventory.load_inventory()
  tasks = []
  for entry in inv["held_out"]:
    if entry["original_task"]:
      examples, choices = PAPER_VALIDATION[entry["dataset"]]
      tasks.append(SweepTask(inventory.held_out_task_name(entry), examples, choices))
  held_out = len(tasks)
  for entry in inv["bigbench"]:
    tasks.append(SweepTask(f"bigbench_{entry['task']}_score_eval", BIGBENCH_EXAMPLES[entry["task"]], None,
                           note="choice count not found"))
  return SweepSpec(
      f"the paper's sweep: {num_experts} experts on {held_out} held-out prompts (validation splits at "
      f"their published sizes) and {len(tasks) - held_out} BIG-bench tasks", tuple(tasks), num_experts,
      unit_experts, batch_size, input_length, target_length,
      ("BIG-bench example counts: Hugging Face's bigbench `default` split (every task.json example); "
       "conceptual_combinations' repeated homonyms sub-task not counted",))


def parse_counts(text: str, flag: str = "--sweep_counts") -> list[SweepTask]:
  """`NAME:EXAMPLES:CHOICES[,...]`, or a JSON file (a path ending in .json) holding
  {"NAME": {"examples": N, "choices": C}, ...}; raises SweepPlanError naming the flag (or the
  file) and the item."""
  if text.strip().endswith(".json"):
    return _counts_file(text.strip(), flag)
  tasks, seen = [], set()
  for item in text.split(","):
    parts = item.strip().rsplit(":", 2)
    numbers = parts[1:] if len(parts) == 3 else []
    if len(parts) != 3 or not parts[0] or not all(re.fullmatch(r"\d+", n) and int(n) > 0 for n in numbers):
      raise SweepPlanError(f"{flag}={text}: item {item.strip()!r}: expected NAME:EXAMPLES:CHOICES with "
                           "positive integers, items separated by commas (e.g. anli_r1:1000:3,copa:100:2), "
                           "or a .json file")
    tasks.append(_counted(parts[0], int(numbers[0]), int(numbers[1]), seen, f"{flag}={text}"))
  return tasks


def _counts_file(path: str, flag: str) -> list[SweepTask]:
  where = f"{flag}={path}"
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise SweepPlanError(f"{where}: cannot read it: {e.strerror}") from None
  except (UnicodeDecodeError, ValueError) as e:
    raise SweepPlanError(f"{where}: not JSON ({e})") from None
  if not isinstance(data, dict) or not data:
    raise SweepPlanError(f"{where}: expected an object {{\"NAME\": {{\"examples\": N, \"choices\": C}}, ...}}")
  tasks, seen = [], set()
  for name, entry in data.items():
    values = [entry.get(k) if isinstance(entry, dict) else None for k in ("examples", "choices")]
    for key, value in zip(("examples", "choices"), values):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SweepPlanError(f"{where}: task {name!r}: field {key!r}: expected a positive integer, got {value!r}")
    tasks.append(_counted(name, values[0], values[1], seen, where))
  return tasks


def _counted(name: str, examples: int, choices: int, seen: set, where: str) -> SweepTask:
  if name in seen:
    raise SweepPlanError(f"{where}: task {name!r} is given twice")
  seen.add(name)
  return SweepTask(name, examples, choices, note="given")


def with_counts(spec: SweepSpec, counts: Sequence[SweepTask]) -> SweepSpec:
  """`spec` with each task of `counts` in place of the task of its name (or added at the end)."""
  given = {t.name: t for t in counts}
  tasks = [given.pop(t.name, t) for t in spec.tasks] + list(given.values())
  return dataclasses.replace(spec, tasks=tuple(tasks))


def registry_tasks(names: Sequence[str], split: str, max_examples: Optional[int]) -> list[SweepTask]:
  """The tasks of the registered tasks or mixtures `names`, counted from their data (`split`,
  at most `max_examples` each, as `eval` reads them): examples, the most choices of any
  example and the scorer's rows; generation tasks (no answer choices) are listed unplanned."""
  from elm_jax.evaluation import expert_eval  # reads data: only when a registry task is planned
  out = []
  for name in names:
    for task in expert_eval.member_tasks(name):
      rows = expert_eval.read_task_rows(task, split, max_examples)
      if not expert_eval.is_ranked(rows):
        out.append(SweepTask(task, len(rows), None, note="decoded (generation), not scored"))
        continue
      per_row = rank_scoring.MAX_CHOICES_PER_ROW
      out.append(SweepTask(task, len(rows), max(len(r["answer_choices"]) for r in rows),
                           rows=sum(-(-len(r["answer_choices"]) // per_row) for r in rows), note=split))
  return out


# ---------------------------------------------------------------------------- the plan
def choose_placement(model_config: T5Config, expert_config: ExpertConfig, memory_bytes: int, num_devices: int,
                     num_experts: int, batch_size: int, input_length: int, target_length: int,
                     mesh_config: Optional[partitioning.MeshConfig] = None,
                     expert_chunk: Optional[int] = None) -> tuple[partitioning.MeshConfig, int, str]:
  """(mesh, expert chunk, why) as `placement.choose` picks them (`placement.decide`) on
  `num_devices` devices of `memory_bytes` each."""
  frozen, expert = EncoderDecoderModel.build(model_config, expert_config).abstract_params()
  data = 1 if mesh_config is None else mesh_config.resolve(num_devices)[0]
  per_expert = placement.scoring_bytes_per_expert(model_config, planning._stacked(expert, 1), batch_size=batch_size,
                                                  input_length=input_length, target_length=target_length,
                                                  data_ways=data)
  try:
    return placement.decide(num_experts, num_devices, batch_size=batch_size, memory=memory_bytes,
                            backbone_bytes=planning.tree_bytes(frozen), per_expert=per_expert,
                            mesh_config=mesh_config, expert_chunk=expert_chunk,
                            batch_flag="--score_batch_size", chunk_flag="--score_experts")
  except placement.PlacementError as e:
    raise SweepPlanError(str(e)) from None


def unit_passes(unit_size: int, chunk: int, ways: int) -> tuple[int, int]:
  """(passes, experts per pass) for a unit of `unit_size` experts, as `RankScorer` cuts them:
  the chunk at most the unit, rounded up to the expert axis; the last pass padded."""
  per_pass = -(-min(chunk, unit_size) // ways) * ways
  return -(-unit_size // per_pass), per_pass


def sweep_flops(tasks: Sequence[SweepTask], unit_sizes: Sequence[int], batches: dict[str, int],
                flops_per_batch: dict[int, float], chunk: int, ways: int) -> float:
  """FLOPs per device of every unit (each task is cut into `unit_sizes`): passes x batches x
  the FLOPs per batch of a `chunk`-expert pass at the task's choice bucket, scaled to the
  experts a pass of the unit holds."""
  total = 0.0
  for size in unit_sizes:
    passes, per_pass = unit_passes(size, chunk, ways)
    total += passes * (per_pass / chunk) * sum(batches[t.name] * flops_per_batch[t.choice_bucket] for t in tasks)
  return total


def plan_sweep(spec: SweepSpec, model_config: T5Config, expert_config: ExpertConfig, chip: planning.Accelerator,
               *, peak_flops: Optional[float] = None, mesh_config: Optional[partitioning.MeshConfig] = None,
               expert_chunk: Optional[int] = None, stream=None) -> SweepPlan:
  """Plans `spec` on this process's devices for `chip`, prints it to `stream` (stdout) and
  returns it; raises SweepPlanError when no task can be planned or the scorer does not fit."""
  stream = stream or sys.stdout
  planned = [t for t in spec.tasks if t.planned]
  if not planned:
    raise SweepPlanError("no task of the sweep has a known choice count; give them with "
                         "--sweep_counts=NAME:EXAMPLES:CHOICES")
  if spec.num_experts > MAX_SWEEP_EXPERTS:
    raise SweepPlanError(f"--sweep_experts={spec.num_experts}: expected at most {MAX_SWEEP_EXPERTS}")
  devices = jax.device_count()
  config = model_config.replace(dropout_rate=0.0)
  mesh_config, chunk, reason = choose_placement(config, expert_config, chip.memory_bytes, devices, spec.num_experts,
                                                spec.batch_size, spec.input_length, spec.target_length,
                                                mesh_config, expert_chunk)
  partitioner = partitioning.Partitioner(mesh_config)
  ways = partitioner.mesh.shape["expert"]
  buckets = sorted({t.choice_bucket for t in planned})
  planning.check_extents([a for b in buckets for a in planning._program_arrays(
      config, "scorer", planning.Extent("experts", chunk, "--score_experts"),
      planning.Extent("batch", spec.batch_size, "--score_batch_size"),
      planning.Extent("input", spec.input_length, "--score_input_length"),
      planning.Extent("target", spec.target_length, "--score_target_length"), planning.Extent("choices", b))])
  experts = [f"expert_{i}" for i in range(spec.num_experts)]
  unit_sizes = [len(u.experts) for u in sweep.plan_units([planned[0].name], experts, spec.unit_experts)]
  units = len(unit_sizes) * len(spec.tasks)
  print(f"elm-jax plan: {spec.title}; {devices} devices as {reason}; per device of a {chip.name} "
        f"({planning._gib(chip.memory_bytes)})", file=stream)
  print(f"model: T5 {config.emb_dim} wide, {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
        f"{config.dtype} activations; experts: {expert_config.describe()}", file=stream)
  size_words = " + ".join(f"{n} of {s}" for s, n in _runs(unit_sizes))
  print(f"units: {units} = {len(spec.tasks)} tasks x {len(unit_sizes)} unit(s) of experts each ({size_words} "
        f"experts; --unit_experts={spec.unit_experts or spec.num_experts})", file=stream)
  batches = {t.name: -(-t.score_rows // spec.batch_size) for t in planned}
  _print_tasks(planned, batches, len(unit_sizes), stream)
  unplanned = [t for t in spec.tasks if not t.planned]
  for note in dict.fromkeys(t.note for t in unplanned):
    listed = [f"{t.name} ({t.examples} examples)" for t in unplanned if t.note == note]
    print(f"not planned: {len(listed)} task(s), {note}: {', '.join(listed)}; add them with "
          "--sweep_counts=NAME:EXAMPLES:CHOICES", file=stream)
  for note in spec.notes:
    print(f"note: {note}", file=stream)
  examples = sum(t.examples for t in planned)
  scores = sum(t.examples * t.choices for t in planned) * spec.num_experts
  print(f"scores: {examples:,} examples x their choices x {spec.num_experts} experts = {scores:,} "
        f"({sum(t.score_rows for t in planned):,} rows, {sum(batches.values()):,} batches of {spec.batch_size} "
        "per expert pass)", file=stream)
  programs = {}
  for bucket in buckets:
    programs[bucket] = planning.plan_scoring(config, expert_config, partitioner, num_experts=chunk,
                                             batch_size=spec.batch_size, input_length=spec.input_length,
                                             target_length=spec.target_length, choices=bucket)
    programs[bucket].name = f"scorer ({bucket} choices a row)"
  flops = sweep_flops(planned, unit_sizes, batches, {b: p.flops for b, p in programs.items()}, chunk, ways)
  largest = programs[buckets[-1]]
  print("\n" + planning.describe(largest, chip, config.dtype, peak_flops), file=stream)
  if len(buckets) > 1:
    each = [f"{b}: {programs[b].flops:.3e} (compiled in {programs[b].compile_seconds:.0f} s)" for b in buckets]
    print("  FLOPs per batch by choices a row: " + ", ".join(each), file=stream)
  peak = peak_flops or chip.peak(config.dtype)
  seconds = flops / peak if peak else None
  print(f"\nFLOPs: {flops:.3e} per device (x {devices} devices = {flops * devices:.3e}), at full lengths "
        f"{spec.input_length}/{spec.target_length} (an upper bound: eval pads each batch only to its longest)",
        file=stream)
  if seconds is not None:
    print(f"time at peak: >= {_duration(seconds)} at {peak / 1e12:.0f} TFLOP/s a device (all of the peak; "
          "divide by the utilisation you expect)", file=stream)
  plan = SweepPlan(units, unit_sizes, examples, scores, batches, dict(partitioner.mesh.shape), chunk, reason,
                   programs, flops, flops * devices, seconds, unplanned)
  over = [p for p in programs.values() if p.estimate > chip.memory_bytes]
  if over:
    advice = planning.suggestions(largest, chip, model_config=config, expert_config=expert_config,
                                  partitioner=partitioner, num_experts=chunk, batch_size=spec.batch_size,
                                  input_length=spec.input_length, target_length=spec.target_length)
    raise SweepPlanError("\n".join([f"the scorer needs about {planning._gib(largest.estimate)} per device, more "
                                    f"than the {planning._gib(chip.memory_bytes)} of a {chip.name}; change one of:"]
                                   + [f"    - {s}" for s in advice]))
  print(f"\nfits: the scorer fits a {chip.name} ({planning._gib(chip.memory_bytes)} per device)", file=stream)
  return plan


def _print_tasks(tasks: Sequence[SweepTask], batches: dict[str, int], chunks: int, stream, shown: int = 12) -> None:
  width = max(len(t.name) for t in tasks[:shown])
  print(f"  {'task':<{width}}  {'examples':>8}  {'choices':>7}  {'rows':>7}  {'batches':>7}  units", file=stream)
  for t in tasks[:shown]:
    print(f"  {t.name:<{width}}  {t.examples:>8}  {t.choices:>7}  {t.score_rows:>7}  {batches[t.name]:>7}  {chunks}",
          file=stream)
  if len(tasks) > shown:
    print(f"  ... and {len(tasks) - shown} more planned task(s)", file=stream)


def _runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
  """[(size, how many in a row)] of `sizes`."""
  return [(size, len(list(run))) for size, run in itertools.groupby(sizes)]


def _duration(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds / 3600:.2f} h"
  if seconds >= 60:
    return f"{seconds / 60:.1f} min"
  return f"{seconds:.3g} s"

