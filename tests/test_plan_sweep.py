"""The sweep in `elm-jax plan`: units cut as `eval` cuts them, scores, batches and passes counted,
the scorer compiled for the mesh and chunk `eval` would choose, FLOPs = batches x passes x the
compiled FLOPs per batch; bad counts refused in one line."""

import io
import json
import math
import re

import gin
import pytest

from elm_jax import partitioning, planning, planning_sweep
from elm_jax.commands import cli
from elm_jax.evaluation import placement, sweep
from elm_jax.models.experts import ExpertConfig
from elm_jax.models.model import EncoderDecoderModel

H100 = planning.ACCELERATORS["h100"]


@pytest.fixture(autouse=True)
def _fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _spec(counts, experts=12, unit_experts=5, batch_size=8):
  return planning_sweep.SweepSpec("test", tuple(planning_sweep.parse_counts(counts)), experts, unit_experts,
                                  batch_size, 32, 8)


@pytest.fixture(scope="module")
def planned(tiny_config):
  out = io.StringIO()
  plan = planning_sweep.plan_sweep(_spec("a:64:2,b:40:3,c:10:20"), tiny_config, ExpertConfig(), H100, stream=out)
  return plan, out.getvalue()


def test_units_scores_and_batches_are_counted_as_eval_cuts_them(planned):
  plan, text = planned
  experts = [f"e{i}" for i in range(12)]
  assert plan.units == len(sweep.plan_units(["a", "b", "c"], experts, 5)) == 9
  assert plan.unit_sizes == [5, 5, 2]
  assert plan.scores == (64 * 2 + 40 * 3 + 10 * 20) * 12
  # c's 20 choices take two rows of at most 16 per example; batches of 8 rows.
  assert plan.batches == {"a": 8, "b": 5, "c": 3}
  # 12 experts >= 8 devices: all on `expert`; the chip holds them all: 12 padded to 16 a pass.
  assert plan.mesh == {"data": 1, "expert": 8, "model": 1} and plan.chunk == 16
  assert sorted(plan.programs) == [2, 4, 16]  # 2 choices; 3 pad to 4; rows of 16 of c's 20
  assert "units: 9 = 3 tasks x 3 unit(s) of experts each (2 of 5 + 1 of 2 experts" in text
  assert "fits: the scorer fits a H100" in text


def test_flops_are_the_compiled_flops_per_batch_times_batches_and_passes(planned, tiny_config):
  plan, _ = planned
  flops = plan.programs
  # Each unit of 5 or 2 experts is one pass of 8 (the expert axis), half the compiled chunk of 16.
  per_task = 8 * flops[2].flops + 5 * flops[4].flops + 3 * flops[16].flops
  assert plan.unit_sizes == [5, 5, 2] and planning_sweep.unit_passes(5, 16, 8) == (1, 8)
  assert math.isclose(plan.flops_per_device, 3 * (8 / 16) * per_task, rel_tol=1e-12)
  assert math.isclose(plan.flops_total, 8 * plan.flops_per_device, rel_tol=1e-12)
  assert math.isclose(plan.seconds_at_peak, plan.flops_per_device / H100.peak("float32"), rel_tol=1e-12)
  # The scaling by experts a pass holds: the scorer compiled for 8 experts does half of 16's work.
  eight = planning.plan_scoring(tiny_config, ExpertConfig(), partitioning.Partitioner(
      partitioning.MeshConfig(data=1, expert=8)), num_experts=8, batch_size=8, input_length=32, target_length=8,
      choices=2)
  assert math.isclose(eight.flops, flops[2].flops / 2, rel_tol=0.02), (eight.flops, flops[2].flops)


def test_flops_scale_with_batches_and_experts(tiny_config):
  one = planning_sweep.plan_sweep(_spec("a:64:2", experts=8, unit_experts=None), tiny_config, ExpertConfig(), H100,
                                  stream=io.StringIO())
  double = planning_sweep.plan_sweep(_spec("a:128:2", experts=16, unit_experts=None), tiny_config, ExpertConfig(),
                                     H100, stream=io.StringIO())
  assert (one.batches["a"], double.batches["a"]) == (8, 16) and (one.chunk, double.chunk) == (8, 16)
  assert one.scores * 4 == double.scores
  # Twice the batches, each pass of 16 experts twice a pass of 8: four times the FLOPs.
  assert math.isclose(double.programs[2].flops, 2 * one.programs[2].flops, rel_tol=0.02)
  assert math.isclose(double.flops_per_device / one.flops_per_device,
                      2 * double.programs[2].flops / one.programs[2].flops, rel_tol=1e-12)


def test_the_chunk_is_placements_for_the_chips_memory(tiny_config):
  """A chip that holds one expert's pass a device gets the expert axis as its chunk, as
  `placement.choose` would give on such a device."""
  frozen, expert = EncoderDecoderModel.build(tiny_config, ExpertConfig()).abstract_params()
  per_expert = placement.scoring_bytes_per_expert(tiny_config, planning._stacked(expert, 1), batch_size=8,
                                                  input_length=32, target_length=8)
  memory = planning.tree_bytes(frozen) + int(1.5 * per_expert / placement.EXPERT_MEMORY_SHARE)
  mesh, chunk, why = planning_sweep.choose_placement(tiny_config, ExpertConfig(), memory, 8, 12, 8, 32, 8)
  assert (mesh.resolve(8), chunk) == ((1, 8, 1), 8) and "1 a device fit" in why
  mesh, chunk, why = planning_sweep.choose_placement(tiny_config, ExpertConfig(), memory, 8, 4, 8, 32, 8)
  assert mesh.resolve(8) == (2, 4, 1) and chunk == 4  # 4 experts: the other devices split the rows
  _, chunk, why = planning_sweep.choose_placement(tiny_config, ExpertConfig(), memory, 8, 12, 8, 32, 8,
                                                   expert_chunk=10)
  assert chunk == 16 and "--score_experts" in why


def test_the_paper_sweep_holds_113_prompts_at_their_sizes_and_bigbench_13():
  spec = planning_sweep.paper_sweep()
  held_out = [t for t in spec.tasks if not t.name.startswith("bigbench_")]
  assert len(held_out) == 113 and spec.num_experts == 296
  assert sum(t.examples for t in held_out) == 125730
  assert {t.choices for t in held_out} == {2, 3, 4}
  bigbench = [t for t in spec.tasks if t.name.startswith("bigbench_")]
  assert len(bigbench) == 13 and all(t.choices is None for t in bigbench)  # not found: not planned
  given = planning_sweep.with_counts(spec, planning_sweep.parse_counts("bigbench_winowhy_score_eval:2862:2,x:5:2"))
  assert [t.choices for t in given.tasks if t.name == "bigbench_winowhy_score_eval"] == [2]
  assert given.tasks[-1].name == "x" and len(given.tasks) == len(spec.tasks) + 1


def _plan_cli(capsys, *args):
  code = cli.main(["plan", "--devices=8", "--gin_file=models/t5_1_1_tiny.gin", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.mark.parametrize("counts, expected", [
    ("a:10", r"--sweep_counts=a:10: item 'a:10': expected NAME:EXAMPLES:CHOICES"),
    ("a:10:0", r"item 'a:10:0': expected NAME:EXAMPLES:CHOICES with positive integers"),
    ("a:ten:2", r"item 'a:ten:2'"),
    ("a:1:2,a:3:2", r"task 'a' is given twice"),
    (":4:2", r"item ':4:2'"),
], ids=["two-fields", "zero-choices", "not-a-number", "twice", "no-name"])
def test_bad_sweep_counts_are_refused_in_one_line(capsys, counts, expected):
  code, out, err = _plan_cli(capsys, "--sweep_experts=4", f"--sweep_counts={counts}")
  assert code == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("elm-jax plan: error: --sweep_counts="), err
  assert re.search(expected, lines[0]), lines[0]


def test_a_bad_counts_file_is_refused_naming_the_file_and_field(capsys, tmp_path):
  path = tmp_path / "counts.json"
  path.write_text(json.dumps({"anli_r1": {"examples": 1000, "choices": "3"}}))
  code, _, err = _plan_cli(capsys, "--sweep_experts=4", f"--sweep_counts={path}")
  assert code == 2 and err.strip().splitlines() == [
      f"elm-jax plan: error: --sweep_counts={path}: task 'anli_r1': field 'choices': expected a positive "
      "integer, got '3'"]
  code, _, err = _plan_cli(capsys, "--sweep_counts=a:4:2")
  assert code == 2 and "--sweep_experts: expected the number of experts in the library" in err


def test_the_command_plans_counts_from_a_file_without_a_recipe(capsys, tmp_path):
  path = tmp_path / "counts.json"
  path.write_text(json.dumps({"a": {"examples": 64, "choices": 2}}))
  code, out, err = _plan_cli(capsys, "--sweep_experts=4", f"--sweep_counts={path}", "--score_batch_size=8",
                             "--score_input_length=32", "--score_target_length=8", "--accelerator=h100")
  assert code == 0, err
  # 4 experts on 8 devices: 4 on `expert`, 2 on `data` splitting the 8 rows.
  assert "8 devices as 2 data x 4 expert x 1 model (chosen for the experts); 4 experts per pass" in out
  assert "experts: adapters (reduction factor 32)" in out  # the paper's adapters by default
  assert "scores: 64 examples x their choices x 4 experts = 512 (64 rows, 8 batches of 8" in out
  assert "time at peak: >=" in out and "fits: the scorer fits a H100" in out


def test_a_registered_mixture_is_counted_from_its_data(capsys):
  code, out, err = _plan_cli(capsys, "--sweep_task=builtin_held_out", "--setup=builtin", "--sweep_experts=6",
                             "--score_input_length=32", "--score_target_length=8", "--unit_experts=4")
  assert code == 0, err
  # 12 held-out prompts of 200 examples (2, 3 or 4 choices): 7 batches of 32 each, 2 units of 4 and 2.
  assert "units: 24 = 12 tasks x 2 unit(s) of experts each (1 of 4 + 1 of 2 experts" in out
  assert "builtin_nli_can_we_infer_score_eval                              200        3      200        7" in out
  assert "scores: 2,400 examples x their choices x 6 experts = 39,600 (2,400 rows, 84 batches of 32" in out
