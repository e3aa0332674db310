"""The demo's report: `report.json` (every number the run measured), `report.md` (written from
report.json alone, so the two always agree) and PNG plots."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from elm_jax import files
from elm_jax.demo.pipeline import SELECTION_METHODS
from elm_jax.library.selection import METHODS

# The rows of the routing table, in order (demo stage `routing`).
ROUTING_ROWS = {"roe_top1": "RoE top-1 (one expert per prompt, from 32 inputs)",
                "roe_merged": "RoE, merged top-k",
                "retrieval": "per-example retrieval (each input's nearest keys vote)",
                "arrow_adapters": "Arrow, adapter experts (prototype: down-projection)",
                "arrow_lora": "Arrow, LoRA experts trained on the same prompts",
                "phatgoose": "PHATGOOSE gates (adapter experts)",
                "uniform": "uniform mixture of every expert's outputs",
                "oracle": "oracle (best expert per prompt)",
                "baseline": "multitask baseline"}

MINIATURE_NOTE = (
    "This is a miniature: a {params:,}-parameter T5 pretrained for {pretrain_steps} steps on a "
    "generated task suite, on one CPU, in minutes. The numbers are whatever this run measured; "
    "they show the method working end to end, not the paper's results (T5-XL, P3, 296 experts).")


def build_report(demo) -> dict[str, Any]:
  import jax
  r = demo.results
  return {"miniature": True, "budget": demo.budget.__dict__, "timings_s": demo.timings,
          "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "cpu_count": os.cpu_count(), "jax": jax.__version__,
                      "device": jax.devices()[0].device_kind},
          "stages": r}


def write_report(demo) -> dict[str, Any]:
  report = build_report(demo)
  files.write_atomically(demo.path("report.json"), json.dumps(report, indent=1).encode())
  plots = write_plots(report, demo.out)
  files.write_atomically(demo.path("report.md"), markdown(report, plots).encode())
  return report


def _pct(value: float) -> str:
  return f"{value:.1f}"


def markdown(report: dict[str, Any], plots: list[str]) -> str:
  s = report["stages"]
  pre, held, ret, seen, cont, comp = (s["pretrain"], s["held_out"], s["retrieval"], s["seen"],
                                      s["continual"], s["composed"])
  lines = ["# ELM in miniature: expert language models versus a multitask model", "",
           MINIATURE_NOTE.format(params=pre["parameters"], pretrain_steps=pre["steps"]), ""]
  if "held_out.png" in plots:
    lines += ["![held-out accuracy of every expert against the multitask baseline](held_out.png)", ""]
  experts = s["experts"]
  lines += ["## Training", "",
            f"- Backbone: span corruption, {pre['steps']} steps of batch {pre['batch']}, final loss "
            f"{pre['final_loss']:.3f}.",
            f"- Experts: {len(experts['prompt_experts'])} prompt experts and {len(experts['dataset_experts'])} "
            f"dataset experts (bottleneck adapters), trained at once in one vmapped program, "
            f"{experts['steps']} steps of batch {experts['batch']} each{_rate(experts)}.",
            f"- Multitask baseline: full fine-tuning on every training prompt, {s['baseline']['steps']} steps of "
            f"batch {s['baseline']['batch']}{_rate(s['baseline'])} ({s['baseline']['examples']} examples; all "
            f"prompt experts together saw {s['baseline']['prompt_expert_examples']}).", ""]
  best = max(held["expert_mean"], key=held["expert_mean"].get)
  beating = sum(v > held["baseline_mean"] for v in held["expert_mean"].values())
  lines += ["## Held-out tasks (rank classification accuracy, %)", "",
            f"Multitask baseline: **{_pct(held['baseline_mean'])}** mean over {len(held['tasks'])} held-out prompts. "
            f"Best single expert: **{best}** at **{_pct(held['expert_mean'][best])}**; "
            f"{beating} of {len(held['expert_mean'])} experts beat the baseline.", "",
            "| held-out prompt | baseline | best expert | its accuracy |", "|---|---|---|---|"]
  for task in held["tasks"]:
    scores = held["experts"][task]["scores"]
    top = max(scores, key=scores.get)
    lines.append(f"| {task} | {_pct(held['baseline'][task])} | {top} | {_pct(scores[top])} |")
  lines += ["", f"## Selecting an expert for an unseen prompt (embedder: {ret['embedder']})", "",
            "Mean held-out accuracy of the expert each method picks (top-1), and of the uniform merge of "
            f"its top-{report['budget']['top_k']}:", "",
            "| method | top-1 | merged top-k |", "|---|---|---|"]
  for method, label in SELECTION_METHODS.items():
    lines.append(f"| {label} | {_pct(ret[f'{method}_top1_mean'])} | {_pct(ret[f'{method}_merged_mean'])} |")
  lines += [f"| multitask baseline | {_pct(held['baseline_mean'])} | |", ""]
  if "routing" in s:
    lines += routing_markdown(s["routing"])
  lines += ["## Seen tasks: experts against the multitask model (negative transfer)", "",
            "| seen prompt | prompt expert | dataset expert | baseline |", "|---|---|---|---|"]
  for task, row in seen["rows"].items():
    lines.append(f"| {task} | {_pct(row['prompt_expert'])} | {_pct(row['dataset_expert'])} | {_pct(row['baseline'])} |")
  lines.append(f"| **mean** | {_pct(seen['prompt_expert_mean'])} | {_pct(seen['dataset_expert_mean'])} | "
               f"{_pct(seen['baseline_mean'])} |")
  lines += ["", "## Continual learning", "",
            f"New experts for {', '.join(cont['new_tasks'])} were added to the library. The existing experts' "
            f"seen-task results {'are unchanged' if cont['old_experts_unchanged'] else 'CHANGED'} "
            f"(prompt experts: {_pct(cont['expert_seen_mean_before'])} before, {_pct(cont['expert_seen_mean_after'])} "
            f"after). The baseline, fine-tuned further on the new tasks, goes from "
            f"{_pct(cont['baseline_seen_mean_before'])} to {_pct(cont['baseline_seen_mean_after'])} on the seen prompts.",
            "", "| new task | metric | new expert | baseline | baseline after further training |", "|---|---|---|---|---|"]
  for task, row in cont["new_task_scores"].items():
    lines.append(f"| {task} | {row['metric']} | {_pct(row['expert'])} | {_pct(row['baseline'])} | "
                 f"{_pct(row['baseline_continual'])} |")
  lines += ["", "## A composed instruction", "",
            f"`{comp['task']}` needs two skills at once; merging their dataset experts "
            f"({', '.join(comp['skills'])}) uniformly:", "",
            f"| model | {comp['metric']} |", "|---|---|",
            f"| merged experts | {_pct(comp['merged'])} |"]
  for skill in comp["skills"]:
    lines.append(f"| {skill} alone | {_pct(comp['single:' + skill])} |")
  lines += [f"| multitask baseline | {_pct(comp['baseline'])} |", ""]
  if "moe" in s:
    moe = s["moe"]
    dropped = "" if moe["fraction_dropped"] is None else (
        f" At the end of training the routers dropped {100 * moe['fraction_dropped']:.1f}% of token "
        "choices (capacity factor 1.25).")
    lines += ["## Dense versus Mixture-of-Experts (instruction tuning, equal active FLOPs)", "",
              f"The multitask recipe ({moe['steps']} steps of batch {moe['batch']}) on a sparse T5 upcycled from "
              f"the backbone: {moe['experts_per_layer']} experts in each of {moe['sparse_layers']} feed-forward "
              f"layers, {moe['router']} routing; {moe['parameters']:,} parameters, "
              f"{moe['active_parameters']:,} active per token (dense: {moe['dense_parameters']:,})." + dropped, "",
              "| model | held-out accuracy | seen accuracy |", "|---|---|---|",
              f"| dense multitask | {_pct(moe['dense_held_out_mean'])} | {_pct(moe['dense_seen_mean'])} |",
              f"| MoE multitask | {_pct(moe['held_out_mean'])} | {_pct(moe['seen_mean'])} |", ""]
  lines += ["## Run", "", "| stage | seconds |", "|---|---|"]
  for stage, seconds in report["timings_s"].items():
    lines.append(f"| {stage} | {seconds:.1f} |")
  m = report["machine"]
  lines += ["", f"Machine: {m['processor']}, {m['cpu_count']} CPUs, jax {m['jax']} on {m['device']}.",
            "Plots: " + ", ".join(plots) if plots else "", ""]
  return "\n".join(lines)


def routing_markdown(routing: dict[str, Any]) -> list[str]:
  """The routing table: each method's mean held-out accuracy and the share of the gap between RoE
  top-1 and the oracle that it closes (negative: below RoE top-1)."""
  lines = ["## Routing the library instead of picking from it", "",
           f"Mean held-out accuracy when the library's prompt experts are mixed per token (Arrow and "
           f"PHATGOOSE, top-{routing['top_k']}, softmax temperature {routing['temperature']:g} and, for "
           f"the gates, {routing.get('gate_temperature', 1.0):.1f}) or per example, inside one "
           "compiled pass over the stacked experts; the last column is the share of the gap from RoE "
           "top-1 to the oracle that each closes.", "",
           "| method | accuracy | gap closed |", "|---|---|---|"]
  for method in routing["methods"]:
    closed = routing["gap_closed"][method]
    lines.append(f"| {ROUTING_ROWS.get(method, method)} | {_pct(routing['mean'][method])} | "
                 f"{'' if closed is None else f'{100 * closed:.0f}%'} |")
  return lines + [""]


def write_plots(report: dict[str, Any], out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = report["stages"]
  written = []
  held = s["held_out"]
  names = sorted(held["expert_mean"], key=held["expert_mean"].get)
  fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(names))))
  colors = ["tab:orange" if n.endswith("_all_prompts") else "tab:blue" for n in names]
  ax.barh(range(len(names)), [held["expert_mean"][n] for n in names], color=colors)
  ax.axvline(held["baseline_mean"], color="black", linestyle="--", label="multitask baseline")
  ax.set_yticks(range(len(names)), [n.replace("builtin_", "") for n in names], fontsize=7)
  ax.set_xlabel("mean held-out accuracy (%)")
  ax.set_title("Each expert (blue: prompt, orange: dataset) vs the multitask model")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "held_out.png"), dpi=110)
  plt.close(fig)
  written.append("held_out.png")

  ret = s["retrieval"]
  methods = list(SELECTION_METHODS)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = range(len(methods))
  ax.bar([i - 0.2 for i in x], [ret[f"{m}_top1_mean"] for m in methods], width=0.4, label="top-1")
  ax.bar([i + 0.2 for i in x], [ret[f"{m}_merged_mean"] for m in methods], width=0.4, label="merged top-k")
  ax.axhline(held["baseline_mean"], color="black", linestyle="--", label="multitask baseline")
  ax.set_xticks(list(x), [METHODS[m].title for m in methods])
  ax.set_ylabel("mean held-out accuracy (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "retrieval.png"), dpi=110)
  plt.close(fig)
  written.append("retrieval.png")

  if "routing" in s:
    routing = s["routing"]
    methods = routing["methods"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1))
    ax.barh(range(len(methods)), [routing["mean"][m] for m in methods],
            color=["tab:gray" if m in ("oracle", "baseline") else "tab:green" for m in methods])
    ax.set_yticks(range(len(methods)), [m.replace("_", " ") for m in methods], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean held-out accuracy (%)")
    ax.set_title("Routing the library against picking one expert")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "routing.png"), dpi=110)
    plt.close(fig)
    written.append("routing.png")

  cont = s["continual"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([0, 1], [cont["expert_seen_mean_before"], cont["expert_seen_mean_after"]], marker="o", label="experts")
  ax.plot([0, 1], [cont["baseline_seen_mean_before"], cont["baseline_seen_mean_after"]], marker="o",
          label="multitask baseline")
  ax.set_xticks([0, 1], ["before new tasks", "after new tasks"])
  ax.set_ylabel("mean seen-task accuracy (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "continual.png"), dpi=110)
  plt.close(fig)
  written.append("continual.png")
  return written


def _rate(stage: dict[str, Any]) -> str:
  """", learning rate X" (stages written before the rate was recorded have none)."""
  return f", learning rate {stage['learning_rate']:.2g}" if "learning_rate" in stage else ""
