"""`elm-jax score` against the Hugging Face reference scores, and its refusals of bad input.

rank_reference.jsonl (made by tools/make_t5_goldens.py with PyTorch) holds, per example, the sum
of log-softmax probabilities of each choice's tokens plus EOS given the input plus EOS.
"""

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.helpers.golden import GOLDEN_DIR, GOLDEN_VARIANTS
from elm_jax import batching
from elm_jax.commands import cli, score_command
from elm_jax.evaluation import rank_scoring
from elm_jax.models.model import EncoderDecoderModel
from elm_jax.models.t5 import init_params


def _run(tmp_path, checkpoint, input_path, *extra):
  output = tmp_path / "scores.jsonl"
  code = cli.main(["score", f"--checkpoint={checkpoint}", f"--input={input_path}",
                   f"--output={output}", *extra])
  return code, output


def _read(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_scores_match_reference(tmp_path, variant):
  directory = GOLDEN_DIR / variant
  code, output = _run(tmp_path, directory, directory / "rank_input.jsonl", "--batch_size=2")
  assert code == 0
  ours, reference = _read(output), _read(directory / "rank_reference.jsonl")
  assert [o["id"] for o in ours] == [r["id"] for r in reference]
  for o, r in zip(ours, reference):
    # Reference: PyTorch float32. A score sums 4-16 token log-probs (~-20 each) from float32
    # logits whose rounding depends on the CPU kernels' summation order, so the error scales
    # with |score|: worst seen 1.2e-6 relative (Intel Xeon, mt5, -90.2). rtol 1e-5 (~80 eps32)
    # keeps a margin; a missing EOS or a wrong mask moves a score by > 1e-2 relative.
    # atol: a floor for scores near 0.
    np.testing.assert_allclose(o["scores"], r["scores"], rtol=1e-5, atol=1e-5)
    assert o["prediction"] == r["prediction"]


def test_length_normalize_divides_by_token_count(tmp_path):
  directory = GOLDEN_DIR / "t5_v1_1"
  code, output = _run(tmp_path, directory, directory / "rank_input.jsonl", "--length_normalize")
  assert code == 0
  for o, r in zip(_read(output), _read(directory / "rank_reference.jsonl")):
    expected = np.asarray(r["scores"]) / np.asarray(r["lengths"])
    # Same reference and error as test_scores_match_reference (worst 3e-7 relative here).
    np.testing.assert_allclose(o["scores"], expected, rtol=1e-5, atol=1e-5)
    assert o["prediction"] == int(np.argmax(expected))


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "inputs": "x", "choices": []}', "bad.jsonl:2: field 'choices' must be a non-empty list"),
    ('{"id": 1, "inputs": "x", "choices": ["a", 3]}', "bad.jsonl:2: field 'choices\\[1\\]' must be a string"),
    ('{"id": 1, "inputs": "x"', "bad.jsonl:2: not valid JSON"),
    ('{"inputs": "x", "choices": ["a"]}', "bad.jsonl:2: field 'id' is missing"),
    ('{"id": 1, "inputs": 5, "choices": ["a"]}', "bad.jsonl:2: field 'inputs' must be a string"),
])
def test_bad_lines_are_refused_and_nothing_is_written(tmp_path, capsys, line, message):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 0, "inputs": "fine", "choices": ["a", "b"]}\n' + line + "\n")
  output = tmp_path / "scores.jsonl"
  output.write_text("previous results\n")
  code = cli.main(["score", f"--checkpoint={GOLDEN_DIR / 't5_v1_1'}", f"--input={bad}",
                   f"--output={output}"])
  assert code == 2
  err = capsys.readouterr().err
  assert "error:" in err and "Traceback" not in err
  assert re.search(message, err), err
  assert output.read_text() == "previous results\n"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  code, output = _run(tmp_path, tmp_path / "nowhere", GOLDEN_DIR / "t5_v1_1" / "rank_input.jsonl")
  assert code == 2
  assert "nowhere" in capsys.readouterr().err
  assert not output.exists()


def test_overlong_text_is_truncated_and_reported_once(tmp_path, capsys):
  directory = GOLDEN_DIR / "t5_v1_1"
  long_input = tmp_path / "long.jsonl"
  with open(long_input, "w") as f:
    for i in range(3):
      f.write(json.dumps({"id": i, "inputs": "the cat sat on the mat " * 40,
                          "choices": ["yes", "no " * 50]}) + "\n")
  code, output = _run(tmp_path, directory, long_input, "--max_input_length=32",
                      "--max_target_length=16")
  assert code == 0
  err = capsys.readouterr().err
  assert err.count("3 input(s) longer than 32 tokens") == 1
  assert err.count("3 choice(s) longer than 16 tokens") == 1
  assert len(_read(output)) == 3


def test_bucketing_bounds_the_number_of_compiled_shapes(tiny_config):
  params = nn.unbox(init_params(tiny_config, jax.random.PRNGKey(0)))
  scorer = rank_scoring.RankScorer(EncoderDecoderModel.build(tiny_config), params, batch_size=4,
                                   max_input_length=64, max_target_length=16)
  rng = np.random.default_rng(0)
  examples = [rank_scoring.Example(list(rng.integers(3, 300, rng.integers(5, 60))),
                                   [list(rng.integers(3, 300, rng.integers(1, 12)))
                                    for _ in range(rng.integers(2, 5))]) for _ in range(40)]
  scores, counts = scorer.score(examples)
  assert len(scores) == 40 and all(len(s) == len(e.choices) for s, e in zip(scores, examples))
  # 10 batches, sorted by length: at most one program each; this tiny model's lengths on powers of
  # two (`rank_scoring.length_rungs`), choice counts on powers of two.
  assert len(scorer.shapes_compiled) <= 10
  for _, _, li, c, lt, _ in scorer.shapes_compiled:
    assert batching.bucket(li, 1) == li and batching.bucket(lt, 1) == lt and c in (2, 4)
  # Batching and padding do not change a score: score one example alone.
  alone, _ = scorer.score(examples[7:8])
  # Two code paths of ours: not exact by construction (another padded shape may get another
  # XLA blocking, hence float32 summation order); bitwise equal here. Tolerance as for the
  # reference scores (relative to |score|, ~43 here).
  np.testing.assert_allclose(alone[0], scores[7], rtol=1e-5, atol=1e-5)


def test_an_input_line_becomes_the_instance_shape_of_tasks_instances():
  record = {"id": "q1", "inputs": "Is it?", "choices": ["yes", "no"], "note": "kept out"}
  assert score_command.check_example(record, "in.jsonl:1") == {
      "id": "q1", "inputs": "Is it?", "answer_choices": ["yes", "no"]}
