"""`elm-jax demo` end to end on the 'test' budget (every stage runs; nothing is learned): the
report is complete and consistent, and a rerun resumes instead of redoing. (How report.md is
written from report.json is tested on a synthetic result in test_report.py.)"""

import json
import os

import pytest

from elm_jax.commands import cli
from elm_jax.demo import pipeline

pytestmark = pytest.mark.slow  # every stage of the demo: about 100 s on 2 cores


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo") / "out"
  assert cli.main(["demo", f"--out={out}", "--budget=test", "--no_progress"]) == 0
  return out


def test_report_is_complete(demo_dir):
  report = json.loads((demo_dir / "report.json").read_text())
  assert report["miniature"] is True
  assert list(report["stages"]) == list(pipeline.STAGES)
  assert set(report["timings_s"]) == set(pipeline.STAGES)
  for plot in ("held_out.png", "retrieval.png", "routing.png", "continual.png"):
    assert (demo_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  s = report["stages"]
  experts = s["experts"]["prompt_experts"] + s["experts"]["dataset_experts"]
  assert len(s["experts"]["prompt_experts"]) == 16 and len(s["experts"]["dataset_experts"]) == 8
  assert sorted(s["library"]["experts"]) == sorted(experts)
  assert len(s["held_out"]["tasks"]) == 12 and set(s["held_out"]["expert_mean"]) == set(experts)
  assert set(s["retrieval"]["prompts"]) == set(s["held_out"]["tasks"])
  routing = s["routing"]
  assert set(routing["accuracy"]) == {"retrieval", "arrow_adapters", "arrow_lora", "phatgoose", "uniform"}
  assert all(set(per_task) == set(s["held_out"]["tasks"]) for per_task in routing["accuracy"].values())
  assert routing["mean"]["roe_top1"] == s["retrieval"]["roe_top1_mean"]
  assert routing["mean"]["baseline"] == s["held_out"]["baseline_mean"]
  if routing["gap_closed"]["oracle"] is not None:  # the gap is measured from RoE top-1 to the oracle
    assert (routing["gap_closed"]["roe_top1"], routing["gap_closed"]["oracle"]) == (0.0, 1.0)
  assert "## Routing the library instead of picking from it" in (demo_dir / "report.md").read_text()
  assert s["continual"]["old_experts_unchanged"] is True
  assert s["baseline"]["examples"] == s["baseline"]["prompt_expert_examples"]  # comparable budget
  moe = s["moe"]
  assert (moe["steps"], moe["batch"]) == (s["baseline"]["steps"], s["baseline"]["batch"])
  assert set(moe["held_out"]) == set(s["held_out"]["tasks"]) and set(moe["seen"]) == set(s["seen"]["tasks"])
  # Top-1 routing with experts as wide as the dense MLP: one router per sparse layer is the only
  # extra active parameter; every expert beyond the first is extra total capacity.
  extra = moe["sparse_layers"] * (moe["experts_per_layer"] - 1) * moe["expert_ffn_parameters"]
  routers = moe["sparse_layers"] * pipeline.BUDGETS["test"].emb_dim * moe["experts_per_layer"]
  assert moe["parameters"] == moe["dense_parameters"] + extra + routers
  assert moe["active_parameters"] == moe["dense_parameters"] + routers
  assert 0.0 <= moe["fraction_dropped"] < 1.0


def test_retrieval_reports_the_held_out_accuracies(demo_dir):
  """Top-1 accuracies in the retrieval stage are the held-out table's numbers for that expert."""
  s = json.loads((demo_dir / "report.json").read_text())["stages"]
  for task, entry in s["retrieval"]["prompts"].items():
    for method in ("roe", "likelihood", "oracle"):
      assert entry[method]["top1_accuracy"] == s["held_out"]["experts"][task]["scores"][entry[method]["top1"]]
  assert s["moe"]["dense_held_out_mean"] == s["held_out"]["baseline_mean"]
  # Adapters and full fine-tuning train at different rates; both are recorded.
  budget = pipeline.BUDGETS["test"]
  assert s["experts"]["learning_rate"] == budget.expert_learning_rate
  assert s["baseline"]["learning_rate"] == budget.learning_rate / 3


def test_rerun_resumes_finished_stages(demo_dir, capsys):
  before = (demo_dir / "report.json").read_text()
  os.remove(demo_dir / "stages" / "moe.json")  # as if interrupted during the last stage
  capsys.readouterr()
  assert cli.main(["demo", f"--out={demo_dir}", "--budget=test", "--no_progress"]) == 0
  err = capsys.readouterr().err
  assert err.count("finished earlier") == len(pipeline.STAGES) - 1
  assert f"[{len(pipeline.STAGES)}/{len(pipeline.STAGES)}] moe: done" in err
  after = json.loads((demo_dir / "report.json").read_text())
  previous = json.loads(before)
  assert after["stages"] == previous["stages"]  # the redone stage measures the same numbers
