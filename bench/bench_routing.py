"""What routing the library costs against plain scoring, on this CPU (BENCHMARKS.md).

Usage (the project's environment), on the output of a full `elm-jax demo` run:
  JAX_PLATFORMS=cpu .venv/bin/python bench/bench_routing.py --demo_out=elm_demo [--write]

What is measured, in one process: the demo's 16 prompt experts (bottleneck adapters, and the
LoRA experts of its routing stage) on one held-out prompt's evaluation rows (64 instances, their
answer choices), each way timed from the call to the scores on the host, after one untimed call
that compiles (every timed call reuses its compiled program):
- one expert scored alone (`expert_eval.score_instances` on a one-expert stack): the reference;
- all 16 experts scored in one pass (`score_instances`), as RoE's candidates are scored;
- routed, all 16 experts mixed in one pass (`routing_methods.route`): uniform, Arrow (adapters;
  LoRA), per-example retrieval (its key search included), and one expert forced; PHATGOOSE
  where the demo's experts have gates.
Then, in the same process:
- gathering per-example experts: the 16 experts repeated to a stack of 64, every instance routed
  to 2 of them (random per-example weights, as retrieval top-2 gives), batch 8, so 2 x 8 < 64
  and the scorer gathers each example's 2 experts (`RoutingInputs.gather_size`), against the
  same routing computing all 64 changes (`gather=False`) and one expert alone at batch 8;
- routed decoding: the instances' inputs decoded (greedy, the choices' length) by one expert
  alone (`expert_decoding.decode_texts`) and by Arrow over the 16 adapters, top-3
  (`routed_scoring.decode_routed_instances`).
Best of 3 and spread (max - min); ratios against each table's reference, from the same run. The
markdown goes to stdout; `--write` puts it into BENCHMARKS.md (one section per CPU model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.bench_sweep import avx512  # noqa: E402
from bench.head_to_head import machine, write_section  # noqa: E402
import numpy as np  # noqa: E402

from elm_jax import expert_stack  # noqa: E402
from elm_jax.evaluation import expert_decoding, expert_eval, routed_scoring  # noqa: E402
from elm_jax.models import routing  # noqa: E402
from elm_jax.library import retrieval, routing_methods  # noqa: E402
from elm_jax.library.loaded import load_experts  # noqa: E402
from tasks.builtin_registry import register_builtin_suite  # noqa: E402

HEADING = "## Routing against plain scoring"


def best_of_3(fn) -> tuple[float, float]:
  fn()  # compiles
  times = []
  for _ in range(3):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), max(times) - min(times)


def _table(ways: dict, reference: str) -> list[str]:
  """Times each way (best of 3, after a compiling call) -> the markdown table's lines, ratios
  against `reference`'s best."""
  results = {}
  for label, fn in ways.items():
    results[label] = best_of_3(fn)
    print(f"{label}: {results[label][0]:.3f} s (spread {results[label][1]:.3f})", file=sys.stderr)
  lines = ["| way | seconds | vs reference |", "|---|---|---|"]
  for label, (best, spread) in results.items():
    lines.append(f"| {label} | {best:.3f} ({spread:.3f}) | {best / results[reference][0]:.2f}x |")
  return lines


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--demo_out", required=True)
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  out = os.path.abspath(args.demo_out)
  budget = json.loads(pathlib.Path(out, "budget.json").read_text())
  register_builtin_suite(num_train=budget["num_train"], num_eval=budget["num_eval"])
  stages = {name: json.loads(pathlib.Path(out, "stages", f"{name}.json").read_text())["result"]
            for name in ("held_out", "routing")}
  names = [n for n in json.loads(pathlib.Path(out, "stages", "retrieval.json").read_text())["result"]["candidates"]]
  task = stages["held_out"]["tasks"][0]
  rows = expert_eval.read_task_rows(task, "validation", budget["eval_examples"])
  options = dict(batch_size=16, max_input_length=budget["input_length"] * 2, max_target_length=budget["choice_length"])
  adapters = load_experts(os.path.join(out, "library"), names)
  loras = load_experts(os.path.join(out, "lora_library"), names)
  one = load_experts(os.path.join(out, "library"), names[:1])
  embedder = retrieval.MiniLMTextEmbedder()
  ways = {
      "one expert, scored alone (reference)": lambda: expert_eval.score_instances(one, rows, **options),
      f"{len(names)} experts, scored in one pass": lambda: expert_eval.score_instances(adapters, rows, **options),
      "routed: one expert forced": lambda: routing_methods.route(adapters, rows, "forced", expert=names[0], **options),
      "routed: uniform mixture": lambda: routing_methods.route(adapters, rows, "uniform", **options),
      "routed: Arrow, adapters, top-3": lambda: routing_methods.route(adapters, rows, "arrow", top_k=3, **options),
      "routed: Arrow, LoRA, top-3": lambda: routing_methods.route(loras, rows, "arrow", top_k=3, **options),
      "routed: per-example retrieval, top-3": lambda: routing_methods.route(
          adapters, rows, "retrieval", top_k=3, embedder=embedder, **options),
  }
  if "phatgoose" in routing_methods.METHODS and "phatgoose" in stages["routing"]["accuracy"]:
    ways["routed: PHATGOOSE, top-3"] = lambda: routing_methods.route(adapters, rows, "phatgoose", top_k=3, **options)
  lines = [f"{HEADING} ({machine()}, {'with' if avx512() else 'without'} AVX-512, {datetime.date.today()})", "",
           f"`JAX_PLATFORMS=cpu .venv/bin/python bench/bench_routing.py --demo_out=DIR` on a full `elm-jax demo` "
           f"output, on an otherwise idle machine: the demo's {len(names)} prompt experts on {len(rows)} instances "
           f"of {task} (their answer choices), batch 16, compiled beforehand. Best of 3 (spread), seconds.", ""]
  lines += _table(ways, "one expert, scored alone (reference)")

  # Gathering: 64 experts, each instance routed to 2 of them, batch 8.
  many = 64
  stacked = expert_stack.take(adapters.stack.params, [i % len(names) for i in range(many)])
  examples = routed_scoring.tokenized(adapters, rows)
  rng = np.random.default_rng(0)
  weights = np.zeros((len(rows), many), np.float32)
  for n in range(len(rows)):
    weights[n, rng.choice(many, 2, replace=False)] = [0.6, 0.4]
  two = routing.RoutingInputs(weights)
  small = dict(options, batch_size=8)
  lines += ["", f"Gathering per-example experts: a stack of {many} (the {len(names)} repeated), every instance "
            "routed to 2 of them, batch 8 (2 x 8 < 64: each example's 2 experts are gathered).", ""]
  lines += _table({
      "one expert, scored alone, batch 8 (reference)": lambda: expert_eval.score_instances(one, rows, **small),
      f"routed to 2 of {many}, gathered": lambda: routed_scoring.score_routed(
          adapters.model, adapters.backbone, stacked, examples, two, batch_size=8,
          max_input_length=small["max_input_length"], max_target_length=small["max_target_length"]),
      f"routed to 2 of {many}, all {many} computed": lambda: routed_scoring.score_routed(
          adapters.model, adapters.backbone, stacked, examples, two, batch_size=8, gather=False,
          max_input_length=small["max_input_length"], max_target_length=small["max_target_length"]),
  }, "one expert, scored alone, batch 8 (reference)")

  # Decoding: the same inputs, greedy, the choices' length.
  arrow = routing.RoutingInputs(routing.uniform_weights(len(rows), len(names)),
                                routing.arrow_routers(adapters.stack.expert_config, adapters.stack.params))
  decode = dict(batch_size=16, max_input_length=options["max_input_length"],
                max_decode_length=options["max_target_length"])
  lines += ["", f"Routed decoding: the {len(rows)} inputs decoded greedily to {decode['max_decode_length']} tokens, "
            "batch 16.", ""]
  lines += _table({
      "one expert decoding alone (reference)": lambda: expert_decoding.decode_texts(
          one, [r["inputs"] for r in rows], **decode),
      f"Arrow over {len(names)} adapters, top-3, decoding": lambda: routed_scoring.decode_routed_instances(
          adapters, rows, arrow, top_k=3, **decode),
  }, "one expert decoding alone (reference)")
  section = "\n".join(lines + [""])
  print(section)
  if args.write:
    write_section(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md", section, family=HEADING)
  return 0


if __name__ == "__main__":
  sys.exit(main())
