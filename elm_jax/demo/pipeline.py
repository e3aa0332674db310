"""The paper's experiments in miniature, on the built-in task suite, as resumable stages.

Each stage writes `<out>/stages/<name>.json` when it finishes; a rerun loads finished stages
instead of redoing them (training stages also resume from their Orbax checkpoints).

  pretrain   a small T5 pretrained with span corruption on the suite's text -> the frozen backbone
  experts    every prompt expert and dataset expert, trained vmapped in one program
  baseline   the multitask (T0-style) model: full fine-tuning on all training prompts, with as
             many training examples as all prompt experts together
  library    the experts in an Expert Library with 100 retrieval keys each
  held_out   every expert and the baseline on the held-out prompts (one pass per prompt)
  retrieval  RoE, likelihood and oracle selection per held-out prompt; top-1 and merged top-k
  routing    the library run routed instead of picked: per-example retrieval, Arrow (the adapter
             experts, and LoRA experts trained on the same prompts), PHATGOOSE gates trained for
             the adapter experts, a uniform mixture, against
             RoE, the oracle and the baseline, with the share of the RoE-to-oracle gap each closes
  seen       seen prompts: each prompt expert and dataset expert against the baseline
  continual  experts for the kept-back tasks added; seen results unchanged; baseline fine-tuned
             further on the new tasks (forgetting)
  composed   the composed instruction answered by merging its two skills' experts
  moe        the baseline's recipe on a sparse Mixture-of-Experts T5 upcycled from the backbone
             (Switch top-1, equal active FLOPs), against the dense baseline (Flan-MoE)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from elm_jax import files, tree_paths
from elm_jax.checkpoints import expert_files, hf
from elm_jax.errors import UserInputError
from elm_jax.evaluation import expert_eval
from elm_jax.library import gates, merging, retrieval, routing_methods, selection
from elm_jax.library.loaded import load_experts
from elm_jax.library.store import ExpertLibrary
from elm_jax.models.adapters import ExpertConfig
from elm_jax.models.moe import MoeConfig
from elm_jax.models.t5 import param_shapes
from elm_jax.models.t5_config import T5Config
from elm_jax.training import run as training_run
from elm_jax.training import train_step as ts
from tasks import builtin_suite, instances
from tasks.builtin_registry import builtin_vocabulary, register_builtin_suite
from tasks.span_corruption import register_builtin_span_corruption

STAGES = ("pretrain", "experts", "baseline", "library", "held_out", "retrieval", "routing", "seen",
          "continual", "composed", "moe")
# The selection methods (library/selection.py) the retrieval stage compares, as it runs them.
SELECTION_METHODS = {"roe": "Retrieval of Experts (32 unlabeled inputs, top-1 votes)",
                     "likelihood": "likelihood (lowest entropy over the choices)",
                     "oracle": "oracle (best accuracy on the 32 inputs, labelled)"}


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much compute each stage gets."""
  emb_dim: int = 64
  layers: int = 2
  pretrain_steps: int = 400
  pretrain_batch: int = 32
  expert_steps: int = 120
  expert_batch: int = 8
  eval_examples: int = 64
  continual_steps: int = 80
  input_length: int = 64
  target_length: int = 16
  top_k: int = 3
  keys_per_expert: int = 100      # retrieval keys per expert (the paper: 100)
  choice_length: int = 32         # answer-choice tokens scored in evaluation
  learning_rate: float = 1e-3     # full-model training: pretraining (the baseline and MoE use 1/3)
  # Adapters on this small, briefly pretrained backbone need a 10x higher rate than full training.
  # Measured on the full budget (seen prompts, prompt experts against the baseline's 90.8):
  # 1e-3 -> 42.5, 1e-2 -> 87.7, 3e-2 -> 86.4. (The paper's 1e-4 is for T5-XL and 50k examples.)
  expert_learning_rate: float = 1e-2
  num_train: int = 2000
  num_eval: int = 200
  moe_experts: int = 8            # experts per sparse layer (every other layer) of the MoE model

  def model_config(self) -> T5Config:
    return T5Config(vocab_size=1024, emb_dim=self.emb_dim, num_heads=4, head_dim=self.emb_dim // 4,
                    mlp_dim=2 * self.emb_dim, num_encoder_layers=self.layers,
                    num_decoder_layers=self.layers, mlp_activations=("gelu", "linear"),
                    logits_via_embedding=False)

  def moe_config(self) -> T5Config:
    """Switch-style: top-1 routing, experts as wide as the dense MLP (equal active FLOPs)."""
    # Every other layer (layer 1, 3, ...), or the only layer of a one-layer model.
    # Token groups of 256 (4 sequences): the one-hot dispatch costs O(group size) per token, and
    # small groups are what a CPU runs fastest (accelerators use thousands).
    return self.model_config().replace(moe=MoeConfig(num_experts=self.moe_experts,
                                                     layer_interval=min(2, self.layers),
                                                     max_group_size=256))


BUDGETS = {
    "full": Budget(),
    # Every stage on a one-layer model: most of a stage is compile time, which scales with depth.
    "quick": Budget(layers=1, pretrain_steps=100, expert_steps=25, eval_examples=16, continual_steps=20,
                    keys_per_expert=20, num_train=600),
    # For tests: every stage runs, nothing is learned.
    "test": Budget(emb_dim=32, layers=1, pretrain_steps=2, pretrain_batch=4, expert_steps=2,
                   expert_batch=2, eval_examples=4, continual_steps=2, input_length=48,
                   target_length=8, top_k=2, num_train=40, num_eval=12, keys_per_expert=4,
                   choice_length=16),
}


class Demo:
  """Runs the stages into `out`; `results[stage]` holds each finished stage's JSON."""

  def __init__(self, out: str, budget: Budget, progress: bool = True, log: Callable[[str], None] = None):
    self.out, self.budget, self.progress = os.path.abspath(out), budget, progress
    self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    self.results: dict[str, Any] = {}
    self.timings: dict[str, float] = {}
    files.check_output_dir(self.out, "--out")
    os.makedirs(os.path.join(self.out, "stages"), exist_ok=True)
    self._check_budget()

  def _check_budget(self) -> None:
    """Records the budget in `<out>/budget.json`; a rerun with another budget is refused, since
    its finished stages (and checkpoints) were made with the recorded one."""
    path = self.path("budget.json")
    wanted = dataclasses.asdict(self.budget)
    if not os.path.isfile(path):
      if any(f.endswith(".json") for f in os.listdir(self.path("stages"))):
        raise DemoError(f"{self.out}: holds finished stages but no budget.json (an earlier version "
                        "of the demo made it); pass another --out")
      files.write_atomically(path, json.dumps(wanted, indent=1, sort_keys=True).encode())
      return
    recorded = _read_json(path)
    if recorded != wanted:
      changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
      raise DemoError(f"{path}: this output was made with another budget ({', '.join(f'{k}: {recorded.get(k)} there, {wanted.get(k)} now' for k in changed[:4])}); "
                      "its finished stages would be reused: pass another --out, or rerun with the "
                      "budget it was made with")

  # ------------------------------------------------------------------ plumbing
  def path(self, *parts: str) -> str:
    return os.path.join(self.out, *parts)

  def run(self, stages=STAGES) -> dict[str, Any]:
    register_builtin_suite(num_train=self.budget.num_train, num_eval=self.budget.num_eval)
    # TensorFlow, SeqIO, JAX and the suite are half a million long-lived objects; frozen, the
    # collector stops walking them on every full collection (2 s of a quick run's pretraining).
    gc.freeze()
    for number, name in enumerate(stages, 1):
      record = self.path("stages", f"{name}.json")
      if os.path.isfile(record):
        saved = _read_json(record)
        if not isinstance(saved, dict) or "result" not in saved or "seconds" not in saved:
          raise DemoError(f"{record}: expected a stage record {{\"result\", \"seconds\"}}; delete it "
                          "to run the stage again")
        self.results[name], self.timings[name] = saved["result"], saved["seconds"]
        self.log(f"[{number}/{len(stages)}] {name}: finished earlier, loaded from {record}")
        continue
      self.log(f"[{number}/{len(stages)}] {name}: {_first_line(getattr(self, 'stage_' + name).__doc__)}")
      start = time.perf_counter()
      result = getattr(self, f"stage_{name}")()
      gc.collect()  # input pipelines and programs of the stage are not needed by the next
      gc.freeze()
      seconds = time.perf_counter() - start
      self.results[name], self.timings[name] = result, seconds
      files.write_atomically(record, json.dumps({"result": result, "seconds": seconds}, indent=1).encode())
      self.log(f"[{number}/{len(stages)}] {name}: done in {seconds:.1f}s")
    return self.results

  def _train(self, run: str, tasks: list[str], steps: int, *, kind: str = "adapter",
             backbone: Optional[str] = None, names: Optional[list[str]] = None, batch: Optional[int] = None,
             learning_rate: Optional[float] = None, model_config: Optional[T5Config] = None,
             upcycle: bool = False) -> dict[str, dict[str, float]]:
    b = self.budget
    expert_config = ExpertConfig(kind=kind, reduction_factor=4)
    default_rate = b.learning_rate if expert_config.trains_backbone else b.expert_learning_rate
    optimizer = ts.OptimizerConfig(name="adamw", learning_rate=learning_rate or default_rate,
                                   schedule="linear", max_grad_norm=1.0)
    return training_run.train(
        self.path(run), tasks, steps, model_config=model_config or b.model_config(), backbone_checkpoint=backbone,
        expert_names=names, batch_size=batch or b.expert_batch, input_length=b.input_length,
        target_length=b.target_length, seed=0, save_every=max(steps // 2, 1), keep=1,
        log_every=max(steps // 4, 1), expert_config=expert_config, optimizer_config=optimizer,
        progress=self.progress, upcycle=upcycle)

  def _bar(self, total: int, desc: str):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not self.progress, dynamic_ncols=True)

  # ------------------------------------------------------------------ task lists
  @staticmethod
  def specs(role: str):
    return [s for s in builtin_suite.SUITE if s.role == role]

  @staticmethod
  def task(spec, score: bool = False) -> str:
    name = builtin_suite.task_name(spec.dataset, spec.prompt)
    return name + "_score_eval" if score and spec.multiple_choice else name

  def prompt_experts(self) -> list[str]:
    return [self.task(s) for s in self.specs("train")]

  def dataset_experts(self) -> list[str]:
    return sorted({f"builtin_{s.dataset}_all_prompts" for s in self.specs("train")})

  # ------------------------------------------------------------------ stages
  def stage_pretrain(self) -> dict[str, Any]:
    """span-corruption pretraining of the backbone on the suite's text"""
    b = self.budget
    task = register_builtin_span_corruption(b.model_config().vocab_size)
    final = self._train("pretrain", [task], b.pretrain_steps, kind="full", batch=b.pretrain_batch)
    params, _ = expert_files.load_expert(self.path("pretrain", "experts", task))
    hf.save_hf_checkpoint(params, b.model_config(), self.path("backbone"), vocab_path=builtin_vocabulary(),
                          overwrite=True)
    return {"task": task, "steps": b.pretrain_steps, "batch": b.pretrain_batch,
            "final_loss": final[task]["loss"], "parameters": int(sum(np.size(v) for v in _leaves(params)))}

  def stage_experts(self) -> dict[str, Any]:
    """every prompt expert and dataset expert, vmapped in one program"""
    tasks = self.prompt_experts() + self.dataset_experts()
    final = self._train("experts", tasks, self.budget.expert_steps, backbone=self.path("backbone"))
    return {"prompt_experts": self.prompt_experts(), "dataset_experts": self.dataset_experts(),
            "steps": self.budget.expert_steps, "batch": self.budget.expert_batch,
            "learning_rate": self.budget.expert_learning_rate,
            "final_loss": {n: m["loss"] for n, m in final.items()}}

  def _baseline_budget(self) -> tuple[int, int, int]:
    """(steps, batch, examples): as many examples as all prompt experts together."""
    b = self.budget
    examples = len(self.prompt_experts()) * b.expert_steps * b.expert_batch
    batch = 4 * b.expert_batch
    return max(1, examples // batch), batch, examples

  def stage_baseline(self) -> dict[str, Any]:
    """the multitask baseline: full fine-tuning on every training prompt"""
    b = self.budget
    steps, batch, examples = self._baseline_budget()
    final = self._train("baseline", ["builtin_train"], steps, kind="full", backbone=self.path("backbone"),
                        names=["multitask"], batch=batch, learning_rate=b.learning_rate / 3)
    self._single_library("baseline_library", self.path("baseline", "experts", "multitask"))
    return {"steps": steps, "batch": batch, "examples": steps * batch, "learning_rate": b.learning_rate / 3,
            "prompt_expert_examples": examples, "final_loss": final["multitask"]["loss"]}

  def _single_library(self, name: str, expert_dir: str) -> None:
    library = ExpertLibrary(self.path(name), create=True)
    if not library.names():
      library.add(expert_dir)

  def stage_library(self) -> dict[str, Any]:
    """the Expert Library with 100 retrieval keys per expert"""
    library = ExpertLibrary(self.path("library"), create=True)
    dirs = sorted(os.listdir(self.path("experts", "experts")))
    bar = self._bar(len(dirs), "library")
    for name in dirs:
      if name not in library.names():
        library.add(self.path("experts", "experts", name),
                    keys=instances.training_keys(name, self.budget.keys_per_expert))
      bar.update(1)
    bar.close()
    return {"experts": library.names(), "keys_per_expert": self.budget.keys_per_expert}

  def _eval_target_length(self, task: str) -> int:
    """Choices are scored up to `choice_length` tokens; generation decodes `target_length`."""
    return self.budget.choice_length if task.endswith("_score_eval") else self.budget.target_length

  def _evaluate(self, library: str, tasks: list[str], experts="all", split: str = "validation"):
    """Every selected expert of `library` on `tasks`, the rank-classification ones in one pass."""
    loaded = load_experts(self.path(library), experts)
    results = expert_eval.evaluate_tasks(
        loaded, tasks, split=split, max_examples=self.budget.eval_examples, batch_size=16,
        max_input_length=self.budget.input_length * 2, max_target_length=self.budget.choice_length,
        max_decode_length=self.budget.target_length)
    return {task: {"dataset": r.dataset, "prompt": r.prompt, "metric": r.primary,
                   "scores": {e: m[r.primary] for e, m in r.metrics.items()}}
            for task, r in zip(tasks, results)}

  def stage_held_out(self) -> dict[str, Any]:
    """every expert and the baseline on the held-out prompts"""
    tasks = [self.task(s, score=True) for s in self.specs("held_out")]
    experts = self._evaluate("library", tasks)
    baseline = self._evaluate("baseline_library", tasks)
    names = sorted(next(iter(experts.values()))["scores"])
    mean = {e: float(np.mean([experts[t]["scores"][e] for t in tasks])) for e in names}
    return {"tasks": tasks, "experts": experts, "baseline": {t: baseline[t]["scores"]["multitask"] for t in tasks},
            "expert_mean": mean,
            "baseline_mean": float(np.mean([baseline[t]["scores"]["multitask"] for t in tasks]))}

  def stage_retrieval(self) -> dict[str, Any]:
    """RoE, likelihood and oracle selection per held-out prompt; top-1 and merged top-k"""
    b, held = self.budget, self.results["held_out"]
    # The prompt experts of the library stage, as the paper (not those the continual stage adds).
    names = [n for n in self.results["library"]["experts"] if not n.endswith("_all_prompts")]
    loaded = load_experts(self.path("library"), names)
    embedder, embedder_name = _retrieval_embedder(self, loaded.library)
    out: dict[str, Any] = {"embedder": embedder_name, "candidates": names, "prompts": {}}
    bar = self._bar(len(held["tasks"]), "retrieval")
    for task in held["tasks"]:
      accuracy = held["experts"][task]["scores"]
      queries = instances.query_instances(task, instances.NUM_QUERIES, labelled=True)
      merged = selection.select_merge_evaluate(
          SELECTION_METHODS, loaded, task, queries=queries, top_k=b.top_k, embedder=embedder, criterion="entropy",
          scoring=dict(batch_size=16, max_input_length=b.input_length * 2, max_target_length=b.choice_length),
          evaluation=dict(max_examples=b.eval_examples, batch_size=16, max_input_length=b.input_length * 2,
                          max_target_length=self._eval_target_length(task)))
      out["prompts"][task] = {m.selection.method: {"top1": m.members[0], "top1_accuracy": accuracy[m.members[0]],
                                                   "top_k": list(m.members), "merged_accuracy": m.score}
                              for m in merged}
      bar.update(1)
    bar.close()
    for method in SELECTION_METHODS:
      out[f"{method}_top1_mean"] = float(np.mean([p[method]["top1_accuracy"] for p in out["prompts"].values()]))
      out[f"{method}_merged_mean"] = float(np.mean([p[method]["merged_accuracy"] for p in out["prompts"].values()]))
    return out

  def stage_routing(self) -> dict[str, Any]:
    """routing the library per token or per example, against RoE, the oracle and the baseline"""
    b, held, ret = self.budget, self.results["held_out"], self.results["retrieval"]
    names = ret["candidates"]
    # LoRA experts of the same prompts, for Arrow's own kind (adapters get a prototype of ours).
    self._train("lora_experts", names, b.expert_steps, kind="lora", backbone=self.path("backbone"))
    lora_library = ExpertLibrary(self.path("lora_library"), create=True)
    for name in names:
      if name not in lora_library.names():
        lora_library.add(self.path("lora_experts", "experts", name))
    # PHATGOOSE: a gate per adapter expert and routed module, trained with the expert frozen
    # for as many steps as the expert took.
    gates.train_gates(self.path("library"), self.path("gates"), names, steps=b.expert_steps,
                      batch_size=b.expert_batch, input_length=b.input_length, target_length=b.target_length,
                      seed=0)
    adapters = load_experts(self.path("library"), names)
    loras = load_experts(self.path("lora_library"), names)
    embedder, _ = _retrieval_embedder(self, adapters.library)
    # Gate scores are dot products of standardised vectors, of the order of the width: their
    # softmax is taken at temperature sqrt(width); the others' at 1.
    gate_temperature = float(np.sqrt(b.emb_dim))
    runs = {"retrieval": (adapters, dict(method="retrieval", embedder=embedder)),
            "arrow_adapters": (adapters, dict(method="arrow")),
            "arrow_lora": (loras, dict(method="arrow")),
            "phatgoose": (adapters, dict(method="phatgoose", temperature=gate_temperature)),
            "uniform": (adapters, dict(method="uniform"))}
    options = dict(top_k=b.top_k, batch_size=16, max_input_length=b.input_length * 2,
                   max_target_length=b.choice_length)
    accuracy: dict[str, dict[str, float]] = {m: {} for m in runs}
    bar = self._bar(len(held["tasks"]) * len(runs), "routing")
    for task in held["tasks"]:
      rows = expert_eval.read_task_rows(task, "validation", b.eval_examples)
      for method, (experts, chosen) in runs.items():
        accuracy[method][task] = routing_methods.route(experts, rows, source=task, **{"temperature": 1.0, **chosen},
                                                       **options).accuracy
        bar.update(1)
    bar.close()
    oracle = float(np.mean([max(held["experts"][t]["scores"][n] for n in names) for t in held["tasks"]]))
    means = {"roe_top1": ret["roe_top1_mean"], "roe_merged": ret["roe_merged_mean"],
             **{m: float(np.mean(list(accuracy[m].values()))) for m in runs},
             "oracle": oracle, "baseline": held["baseline_mean"]}
    gap = oracle - means["roe_top1"]
    return {"methods": list(means), "top_k": b.top_k, "temperature": 1.0, "gate_temperature": gate_temperature,
            "gate_steps": b.expert_steps, "tasks": held["tasks"],
            "accuracy": accuracy, "mean": means,
            "gap_closed": {m: (None if gap == 0 else (v - means["roe_top1"]) / gap) for m, v in means.items()}}

  def stage_seen(self) -> dict[str, Any]:
    """seen prompts: prompt and dataset experts against the baseline"""
    specs = [s for s in self.specs("train") if s.multiple_choice]
    tasks = [self.task(s, score=True) for s in specs]
    experts = self._evaluate("library", tasks)
    baseline = self._evaluate("baseline_library", tasks)
    rows = {}
    for spec, task in zip(specs, tasks):
      scores = experts[task]["scores"]
      rows[task] = {"prompt_expert": scores[self.task(spec)],
                    "dataset_expert": scores[f"builtin_{spec.dataset}_all_prompts"],
                    "baseline": baseline[task]["scores"]["multitask"]}
    return {"tasks": tasks, "rows": rows, "all_experts": {t: experts[t]["scores"] for t in tasks},
            **{f"{k}_mean": float(np.mean([r[k] for r in rows.values()]))
               for k in ("prompt_expert", "dataset_expert", "baseline")}}

  def stage_continual(self) -> dict[str, Any]:
    """new experts for the kept-back tasks; the baseline fine-tuned further on them"""
    b = self.budget
    new_tasks = [self.task(s) for s in self.specs("continual")]
    self._train("continual_experts", new_tasks, b.continual_steps, backbone=self.path("backbone"))
    library = ExpertLibrary(self.path("library"))
    for task in new_tasks:
      if task not in library.names():
        library.add(self.path("continual_experts", "experts", task),
                    keys=instances.training_keys(task, self.budget.keys_per_expert))
    seen_tasks = self.results["seen"]["tasks"]
    old = sorted(self.results["library"]["experts"])
    seen_after = self._evaluate("library", seen_tasks, experts=old)
    unchanged = all(seen_after[t]["scores"] == self.results["seen"]["all_experts"][t] for t in seen_tasks)
    # The baseline keeps training, on the new tasks only (sequential fine-tuning).
    params, _ = expert_files.load_expert(self.path("baseline", "experts", "multitask"))
    hf.save_hf_checkpoint(params, b.model_config(), self.path("baseline_checkpoint"),
                          vocab_path=builtin_vocabulary(), overwrite=True)
    self._train("baseline_continual", ["builtin_continual"], b.continual_steps * len(new_tasks), kind="full",
                backbone=self.path("baseline_checkpoint"), names=["multitask_continual"],
                learning_rate=b.learning_rate / 3)
    # Its own library: it was trained from the baseline's weights, not from the backbone.
    self._single_library("baseline_continual_library",
                         self.path("baseline_continual", "experts", "multitask_continual"))
    baseline_seen = self._evaluate("baseline_continual_library", seen_tasks)
    new_experts = self._evaluate("library", new_tasks, experts=new_tasks)
    new_baseline = self._evaluate("baseline_library", new_tasks)
    new_continual = self._evaluate("baseline_continual_library", new_tasks)
    return {
        "new_tasks": new_tasks, "old_experts_unchanged": unchanged,
        "expert_seen_mean_before": self.results["seen"]["prompt_expert_mean"],
        "expert_seen_mean_after": float(np.mean([seen_after[t]["scores"][_expert_for(t)] for t in seen_tasks])),
        "baseline_seen_mean_before": self.results["seen"]["baseline_mean"],
        "baseline_seen_mean_after": float(np.mean([baseline_seen[t]["scores"]["multitask_continual"]
                                                   for t in seen_tasks])),
        "new_task_scores": {t: {"metric": new_experts[t]["metric"], "expert": new_experts[t]["scores"][t],
                                "baseline": new_baseline[t]["scores"]["multitask"],
                                "baseline_continual": new_continual[t]["scores"]["multitask_continual"]}
                            for t in new_tasks}}

  def stage_composed(self) -> dict[str, Any]:
    """the composed instruction, by merging the two matching experts"""
    spec = self.specs("composed")[0]
    task = self.task(spec)
    skills = [f"builtin_{d}_all_prompts" for d in builtin_suite.COMPOSED_FROM[spec.dataset]]
    loaded = load_experts(self.path("library"), skills)
    scores = _evaluate_trees(self, loaded, [merging.merge_uniform(loaded.stack)] +
                             [loaded.stack.tree(n) for n in skills], task)
    baseline = self._evaluate("baseline_library", [task], experts=["multitask"])[task]
    return {"task": task, "skills": skills, "metric": "rougeL", "merged": scores[0],
            **{f"single:{n}": s for n, s in zip(skills, scores[1:])},
            "baseline": baseline["scores"]["multitask"]}


  def stage_moe(self) -> dict[str, Any]:
    """the multitask recipe on a Mixture-of-Experts T5 upcycled from the backbone"""
    b = self.budget
    steps, batch, _ = self._baseline_budget()
    config = b.moe_config()
    final = self._train("moe", ["builtin_train"], steps, kind="full", backbone=self.path("backbone"),
                        names=["multitask_moe"], batch=batch, learning_rate=b.learning_rate / 3,
                        model_config=config, upcycle=True)["multitask_moe"]
    self._single_library("moe_library", self.path("moe", "experts", "multitask_moe"))
    held_tasks, seen_tasks = self.results["held_out"]["tasks"], self.results["seen"]["tasks"]
    scores = self._evaluate("moe_library", held_tasks + seen_tasks)
    moe = {t: scores[t]["scores"]["multitask_moe"] for t in held_tasks + seen_tasks}
    dense_seen = {t: r["baseline"] for t, r in self.results["seen"]["rows"].items()}
    count = lambda c: int(sum(np.prod(s) for s in tree_paths.flatten(param_shapes(c)).values()))
    total, dense_total = count(config), count(b.model_config())
    sparse_layers = sum(config.is_sparse(i) for i in range(b.layers)) * 2
    expert_ffn = 3 * config.emb_dim * config.mlp_dim  # wi_0, wi_1, wo of one expert
    # Active per token: the dense parameters plus one router per sparse layer (top-1 routing).
    active = dense_total + sparse_layers * config.emb_dim * config.moe.num_experts
    return {"experts_per_layer": config.moe.num_experts, "sparse_layers": sparse_layers,
            "router": "top-1 (Switch)", "steps": steps, "batch": batch,
            "parameters": total, "active_parameters": active, "dense_parameters": dense_total,
            "expert_ffn_parameters": expert_ffn,
            "final_cross_entropy": final.get("cross_entropy", final["loss"]),
            "fraction_dropped": final.get("fraction_dropped"),
            "load_balancing_loss": final.get("load_balancing_loss"),
            "held_out": {t: moe[t] for t in held_tasks}, "seen": {t: moe[t] for t in seen_tasks},
            "held_out_mean": float(np.mean([moe[t] for t in held_tasks])),
            "seen_mean": float(np.mean([moe[t] for t in seen_tasks])),
            "dense_held_out_mean": self.results["held_out"]["baseline_mean"],
            "dense_seen_mean": float(np.mean(list(dense_seen.values())))}


# ---------------------------------------------------------------------------- helpers
class DemoError(UserInputError):
  """An output directory the demo cannot use or resume."""


def _read_json(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DemoError(f"{path}: not valid JSON ({e}); delete it to run that stage again") from None


def _first_line(text: Optional[str]) -> str:
  return (text or "").strip().splitlines()[0] if text else ""


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def _expert_for(task: str) -> str:
  return task[:-len("_score_eval")] if task.endswith("_score_eval") else task


def _retrieval_embedder(demo: Demo, library):
  """MiniLM when its package is installed, else the backbone's own encoder."""
  try:
    return retrieval.MiniLMTextEmbedder(), "minilm"
  except Exception as e:  # the package is optional at run time
    demo.log(f"note: MiniLM unavailable ({e}); retrieving with the backbone's encoder")
    return retrieval.backbone_embedder(library), "t5"


def _evaluate_trees(demo: Demo, loaded, trees, task: str) -> list[float]:
  """Primary metric of each expert tree (same config as `loaded`) on one task, in one pass."""
  return selection.evaluate_trees(loaded, trees, task, max_examples=demo.budget.eval_examples, batch_size=16,
                                  max_input_length=demo.budget.input_length * 2,
                                  max_target_length=demo._eval_target_length(task))[1]
