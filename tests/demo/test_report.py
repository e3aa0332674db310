"""The demo's report written from a synthetic result: report.md states report.json's numbers
(every table row, the headline figures, the learning rates) and the plots are PNGs. The numbers
are random, so a row that reads the wrong field would show another number."""

import numpy as np
import pytest

from elm_jax.demo import report

PROMPT = [f"builtin_d{d}_p{p}" for d in range(4) for p in range(4)]
DATASET = [f"builtin_d{d}_all_prompts" for d in range(8)]
HELD = [f"builtin_h{t}_score_eval" for t in range(12)]
SEEN = [f"builtin_d{d}_p0_score_eval" for d in range(4)]
NEW = ["builtin_new_a", "builtin_new_b"]


def _synthetic(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  pct = lambda: float(np.round(rng.uniform(0, 100), 3))  # noqa: E731
  experts = PROMPT + DATASET
  held = {t: {"dataset": t, "prompt": t, "metric": "accuracy", "scores": {e: pct() for e in experts}} for t in HELD}
  rows = {t: {"prompt_expert": pct(), "dataset_expert": pct(), "baseline": pct()} for t in SEEN}
  retrieval = {"embedder": "minilm", "candidates": PROMPT, "prompts": {}}
  for t in HELD:
    retrieval["prompts"][t] = {m: {"top1": PROMPT[0], "top1_accuracy": pct(), "top_k": PROMPT[:3],
                                   "merged_accuracy": pct()} for m in ("roe", "likelihood", "oracle")}
  for m in ("roe", "likelihood", "oracle"):
    retrieval[f"{m}_top1_mean"], retrieval[f"{m}_merged_mean"] = pct(), pct()
  stages = {
      "pretrain": {"task": "span", "steps": 7, "batch": 4, "final_loss": 3.25, "parameters": 123456},
      "experts": {"prompt_experts": PROMPT, "dataset_experts": DATASET, "steps": 11, "batch": 3,
                  "learning_rate": 0.01, "final_loss": {e: 1.0 for e in experts}},
      "baseline": {"steps": 13, "batch": 12, "examples": 156, "learning_rate": 0.001 / 3,
                   "prompt_expert_examples": 528, "final_loss": 0.5},
      "library": {"experts": experts, "keys_per_expert": 4},
      "held_out": {"tasks": HELD, "experts": held, "baseline": {t: pct() for t in HELD},
                   "expert_mean": {e: pct() for e in experts}, "baseline_mean": pct()},
      "retrieval": retrieval,
      "seen": {"tasks": SEEN, "rows": rows, "all_experts": {},
               **{f"{k}_mean": pct() for k in ("prompt_expert", "dataset_expert", "baseline")}},
      "continual": {"new_tasks": NEW, "old_experts_unchanged": True, "expert_seen_mean_before": pct(),
                    "expert_seen_mean_after": pct(), "baseline_seen_mean_before": pct(),
                    "baseline_seen_mean_after": pct(),
                    "new_task_scores": {t: {"metric": "rougeL", "expert": pct(), "baseline": pct(),
                                            "baseline_continual": pct()} for t in NEW}},
      "composed": {"task": "builtin_comp", "skills": DATASET[:2], "metric": "rougeL", "merged": pct(),
                   **{f"single:{s}": pct() for s in DATASET[:2]}, "baseline": pct()},
      "moe": {"experts_per_layer": 8, "sparse_layers": 2, "router": "top-1 (Switch)", "steps": 13,
              "batch": 12, "parameters": 222222, "active_parameters": 123999, "dense_parameters": 123456,
              "expert_ffn_parameters": 999, "final_cross_entropy": 1.5, "fraction_dropped": 0.0625,
              "load_balancing_loss": 1.01, "held_out": {}, "seen": {}, "held_out_mean": pct(),
              "seen_mean": pct(), "dense_held_out_mean": pct(), "dense_seen_mean": pct()},
  }
  return {"miniature": True, "budget": {"top_k": 3, "expert_learning_rate": 0.01, "learning_rate": 0.001},
          "timings_s": {name: float(i) + 0.25 for i, name in enumerate(stages)},
          "machine": {"processor": "x86_64", "cpu_count": 2, "jax": "0.10.2", "device": "cpu"},
          "stages": stages}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  r = _synthetic()
  plots = report.write_plots(r, str(out))
  return r, report.markdown(r, plots), plots, out


def test_plots_are_pngs(written):
  _, _, plots, out = written
  assert plots == ["held_out.png", "retrieval.png", "continual.png"]
  for plot in plots:
    assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_states_every_number_of_the_json(written):
  r, md, _, _ = written
  s = r["stages"]
  assert "This is a miniature" in md and "123,456-parameter T5" in md
  assert f"batch {s['experts']['batch']} each, learning rate {s['experts']['learning_rate']:.2g}." in md
  assert f"batch {s['baseline']['batch']}, learning rate {s['baseline']['learning_rate']:.2g} (" in md
  assert f"Multitask baseline: **{s['held_out']['baseline_mean']:.1f}**" in md
  means = s["held_out"]["expert_mean"]
  best = max(means, key=means.get)
  assert f"Best single expert: **{best}** at **{means[best]:.1f}**" in md
  beating = sum(v > s["held_out"]["baseline_mean"] for v in means.values())
  assert f"{beating} of {len(means)} experts beat the baseline" in md
  for task in s["held_out"]["tasks"]:
    scores = s["held_out"]["experts"][task]["scores"]
    top = max(scores, key=scores.get)
    assert f"| {task} | {s['held_out']['baseline'][task]:.1f} | {top} | {scores[top]:.1f} |" in md
  for method in ("roe", "likelihood", "oracle"):
    assert f"| {s['retrieval'][method + '_top1_mean']:.1f} | {s['retrieval'][method + '_merged_mean']:.1f} |" in md
  for task, row in s["seen"]["rows"].items():
    assert f"| {task} | {row['prompt_expert']:.1f} | {row['dataset_expert']:.1f} | {row['baseline']:.1f} |" in md
  seen = s["seen"]
  assert (f"| **mean** | {seen['prompt_expert_mean']:.1f} | {seen['dataset_expert_mean']:.1f} | "
          f"{seen['baseline_mean']:.1f} |") in md
  for task, row in s["continual"]["new_task_scores"].items():
    assert (f"| {task} | rougeL | {row['expert']:.1f} | {row['baseline']:.1f} | "
            f"{row['baseline_continual']:.1f} |") in md
  assert f"| merged experts | {s['composed']['merged']:.1f} |" in md
  for skill in s["composed"]["skills"]:
    assert f"| {skill} alone | {s['composed']['single:' + skill]:.1f} |" in md
  moe = s["moe"]
  assert f"| dense multitask | {moe['dense_held_out_mean']:.1f} | {moe['dense_seen_mean']:.1f} |" in md
  assert f"| MoE multitask | {moe['held_out_mean']:.1f} | {moe['seen_mean']:.1f} |" in md
  assert "222,222 parameters, 123,999 active per token (dense: 123,456)" in md
  assert "dropped 6.2% of token choices" in md
  for stage, seconds in r["timings_s"].items():
    assert f"| {stage} | {seconds:.1f} |" in md


def test_a_changed_experts_result_is_reported(written):
  r, _, _, _ = written
  r = dict(r, stages=dict(r["stages"], continual=dict(r["stages"]["continual"], old_experts_unchanged=False)))
  assert "seen-task results CHANGED" in report.markdown(r, [])
